"""What the demo runs in place of downloads, and the PyTorch side it checks its exports against.

- `toy_landmark_graph`: an ONNX graph with 2d106det's signature, so that the landmark recipes and
  `precompute-landmarks` run offline;
- `bpe_tokenizer`: a byte-level BPE tokenizer trained on the spot, in place of Vicuna's;
- `logits_with_prior`: EmoLA's facial prior tokens in PyTorch over a transformers export (the
  README's recipe as code), the reference an exported model's logits are compared with.

torch, peft, onnx and tokenizers are imported where used: the library does not need them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def bpe_tokenizer(directory: Path, corpus: list[str], vocab_size: int):
    """A byte-level BPE with LLaMA's special tokens (`<unk>`, `<s>` prepended, `</s>`, `<pad>`),
    trained on `corpus` and saved to `directory` as a transformers tokenizer."""
    # deferred: start-up time (tokenizers, transformers)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


def toy_landmark_graph(path: str | Path, batch: int | str = 1, normalises_inside: bool = False) -> Path:
    """A small stand-in for 2d106det.onnx with its signature (no download):
    `[batch, 3, 192, 192] -> [batch, 212]`: 16x16 average pooling, a dense layer, tanh.
    Unlike a global mean, the output depends on where things are, so crop and resize matter.
    `normalises_inside` puts `_minus`/`_mul` nodes first, as mxnet-converted 2d106det graphs have."""
    # deferred: start-up time (onnx)
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((432, 212)) * 0.05).astype(np.float32)
    bias = (rng.standard_normal(212) * 0.1).astype(np.float32)
    nodes, first = [], "data"
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [432, 212], weight.ravel()),
             helper.make_tensor("b", TensorProto.FLOAT, [212], bias),
             helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1])]
    if normalises_inside:
        inits += [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                  helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])]
        nodes += [helper.make_node("Sub", ["data", "half"], ["centred"], name="_minus0"),
                  helper.make_node("Mul", ["centred", "two"], ["scaled"], name="_mul0")]
        first = "scaled"
    nodes += [
        helper.make_node("AveragePool", [first], ["pooled"], kernel_shape=[16, 16], strides=[16, 16], name="pool"),
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w"], ["projected"], name="fc"),
        helper.make_node("Add", ["projected", "b"], ["biased"], name="fc_bias"),
        helper.make_node("Tanh", ["biased"], ["fc1"], name="squash"),
    ]
    graph = helper.make_graph(
        nodes, "landmark_106",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, 192, 192])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, 212])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return Path(path)


def logits_with_prior(model, prior_file: str | Path | list, ids: np.ndarray, pixels: np.ndarray, landmarks: np.ndarray,
                      mask: np.ndarray, position: str = "after") -> np.ndarray:
    """Logits of an `hf` export (or a PEFT model over one) with EmoLA's prior tokens: one token per prior
    projector file (`prior_projector*.safetensors`, a list in the config's prior order), each made from its
    slice of `landmarks` (the priors' features concatenated), placed `position` the visual tokens, fed as
    `inputs_embeds`. ids `[batch, seq]` (image placeholders expanded), pixels `[batch, size, size, 3]`,
    landmarks `[batch, prior_dim]`, mask `[batch, seq]`."""
    # deferred: start-up time (torch)
    import torch

    embeds = embeds_with_prior(model, prior_file, ids, pixels, landmarks, position)
    mask = torch.tensor(mask)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits.float().numpy()


def embeds_with_prior(model, prior_file: str | Path | list, ids: np.ndarray, pixels: np.ndarray,
                      landmarks: np.ndarray, position: str = "after"):
    """The `inputs_embeds` `[batch, seq, embed]` (torch) that `logits_with_prior` feeds: the token
    embeddings with the visual and prior tokens spliced in at the image placeholders (what
    transformers' `generate(inputs_embeds=...)` continues)."""
    # deferred: start-up time (peft, safetensors, torch)
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    files = [prior_file] if isinstance(prior_file, (str, Path)) else list(prior_file)
    input_ids = torch.tensor(ids)
    with torch.no_grad():
        tokens, start = [], 0
        llava = model.get_base_model() if isinstance(model, PeftModel) else model
        dtype = llava.dtype  # the export's; the inputs follow it
        for file in files:
            prior = load_file(file)
            dim = prior["linear_1.weight"].shape[1]
            h = torch.nn.functional.gelu(torch.nn.functional.linear(
                torch.tensor(landmarks[:, start:start + dim]).to(dtype), prior["linear_1.weight"],
                prior["linear_1.bias"]))
            tokens.append(torch.nn.functional.linear(h, prior["linear_2.weight"], prior["linear_2.bias"]))
            start += dim
        prior_tokens = torch.stack(tokens, dim=1)
        visual = torch.stack(llava.model.get_image_features(
            pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2).to(dtype), return_dict=True).pooler_output)
        parts = [visual, prior_tokens] if position == "after" else [prior_tokens, visual]
        image_side = torch.cat(parts, dim=1)
        is_image = input_ids == llava.config.image_token_id
        embeds = model.get_input_embeddings()(torch.where(is_image, 0, input_ids))
        embeds[is_image] = image_side.reshape(-1, image_side.shape[-1]).to(embeds.dtype)
        return embeds
