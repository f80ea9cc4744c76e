"""LoRA training throughput: this project's jitted step beside transformers + peft in PyTorch.

CPU (default): the same mid-size LLaVA-shaped model on both sides (decoder 8 x 1024, FFN 2816,
vocab 32000; a 4-layer CLIP at 224 px, so 256 image tokens), float32, LoRA r=64 (alpha 128) on all
seven decoder projections plus the multi-modal projector trained, AdamW, gradient clipping,
sequence 1024, batch 2, the same batches on both sides, this machine's CPU, one run. The last line
is `train_speedup_vs_torch: <jax/torch>`.

    python benchmarks/train_throughput.py [--seq 1024] [--batch 2] [--steps 3]

GPU (`--gpu-7b`): the EmoLA-7B train step (bf16 weights, LoRA r=128 in float32, prior projector and
multi-modal projector trained, sequence 2048) on one accelerator, one line per case
`batch:remat:attention`, with tokens per second, peak memory and model FLOPs utilisation.

    python benchmarks/train_throughput.py --gpu-7b --cases 8:full:cudnn,8:full:xla,16:dots:cudnn

Model FLOPs of a LoRA step, per token (no rematerialisation counted): the frozen decoder costs
2N forward and 2N backward (activation gradients only; frozen weights get none; the lm_head only on
the scored quarter of the synthetic rows, as the loss skips the rest), the LoRA factors
6 N_lora, attention 12 L S d (forward + backward, causal half), the vision tower 2 N_vision per
image token forward. MFU divides by the chip's dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _experiment(model, *, base, steps, batch, seq, remat, attention, trainable=None):
    from emola_jax.data.synthetic import SyntheticData
    from emola_jax.sharding import MeshConfig
    from emola_jax.train.config import Experiment, TrainConfig

    train = TrainConfig(base=base, steps=steps, remat=remat, attention=attention, mesh=MeshConfig(data=1),
                        warmup_ratio=0.0)
    if trainable is not None:
        train = dataclasses.replace(train, trainable=trainable)
    return Experiment(model=model, train=train, data=SyntheticData(batch_size=batch, seq_length=seq))


def _time_jax(experiment, steps: int) -> tuple[float, float]:
    """(tokens per second, seconds per step) after two warm-up steps."""
    from emola_jax.data.synthetic import SyntheticLoader
    from emola_jax.train.loop import Trainer, next_batch

    trainer = Trainer(experiment)
    loader = SyntheticLoader(experiment.data, trainer.config)
    batches = [next_batch(loader, 1) for _ in range(steps + 2)]
    for batch in batches[:2]:
        float(trainer.step(batch)["loss"])
    start = time.perf_counter()
    tokens = 0
    for batch in batches[2:]:
        metrics = trainer.step(batch)
        tokens += int(batch.attention_mask.sum())
    float(metrics["loss"])
    elapsed = time.perf_counter() - start
    return tokens / elapsed, elapsed / steps


def cpu(args) -> None:
    import midsize
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from converters import convert
    from emola_jax.checkpoint import load_config
    from emola_jax.config import LoRAConfig
    from emola_jax.data.synthetic import SyntheticData, make_batch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hf_config = midsize.llava_config()
    reference = LlavaForConditionalGeneration(hf_config)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(Path(tmp) / "hf")
        convert(Path(tmp) / "hf", Path(tmp) / "base")
        model = load_config(Path(tmp) / "base").replace(lora=LoRAConfig(rank=64, alpha=128.0), prior_position="off")
        trainable = ((r"language_model/.*/lora_[ab]", 1e-4), (r"multi_modal_projector/.*", 2e-5))
        experiment = _experiment(model, base=str(Path(tmp) / "base"), steps=args.steps + 2, batch=args.batch,
                                 seq=args.seq, remat="none", attention="auto", trainable=trainable)
        jax_tps, jax_step = _time_jax(experiment, args.steps)
    print(f"jax  (this project): {jax_tps:8.1f} tokens/s  ({jax_step:.2f} s/step)", flush=True)

    peft_model = get_peft_model(reference, LoraConfig(
        r=64, lora_alpha=128, lora_dropout=0.0, target_modules=rf".*language_model.*\.({'|'.join(LORA_TARGETS)})"))
    for name, param in peft_model.named_parameters():
        if "multi_modal_projector" in name:
            param.requires_grad_(True)
    lora = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    projector = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": 1e-4}, {"params": projector, "lr": 2e-5}],
                                  weight_decay=0.0)
    peft_model.train()
    data = SyntheticData(batch_size=args.batch, seq_length=args.seq)

    def torch_step(index: int) -> int:
        batch = make_batch(data, model, index)
        out = peft_model(
            input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
            pixel_values=torch.tensor(batch.pixel_values).permute(0, 3, 1, 2),
            attention_mask=torch.tensor(batch.attention_mask),
            labels=torch.tensor(batch.labels, dtype=torch.long),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + projector, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch.attention_mask.sum())

    torch_step(0)
    start = time.perf_counter()
    tokens = sum(torch_step(i + 1) for i in range(args.steps))
    torch_elapsed = time.perf_counter() - start
    torch_tps = tokens / torch_elapsed
    print(f"torch (transformers + peft): {torch_tps:8.1f} tokens/s  ({torch_elapsed / args.steps:.2f} s/step)")
    print(f"train_speedup_vs_torch: {jax_tps / torch_tps:.2f}")


def lora_step_flops(config, seq: int, scored_fraction: float) -> tuple[float, float]:
    """(model FLOPs per token of a LoRA step, 6N-convention FLOPs per token) for `config`; the step
    makes logits only on scored positions, so its count has the head on `scored_fraction` of them."""
    t, v = config.text, config.vision
    d, f, layers, hd = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.resolved_head_dim
    q_out, kv_out = t.num_attention_heads * hd, t.num_key_value_heads * hd
    per_layer = d * q_out + 2 * d * kv_out + q_out * d + 3 * d * f
    decoder, head = layers * per_layer, d * t.vocab_size
    r = config.lora.rank
    lora = layers * r * ((d + q_out) + 2 * (d + kv_out) + (q_out + d) + 3 * (d + f))
    attention = 12 * layers * seq * q_out / 2
    vision_params = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    vision = 2 * vision_params * config.num_visual_tokens / seq  # spread over the row's tokens
    return 4 * (decoder + scored_fraction * head) + 6 * lora + attention + vision, 6 * (decoder + head) + attention


def gpu_7b(args) -> None:
    import jax

    import configs
    from emola_jax.data.synthetic import SyntheticData
    from emola_jax.train.config import planned_model

    device = jax.devices()[0]
    name = next((k for k in PEAK_BF16 if k in device.device_kind), None)
    peak = PEAK_BF16.get(name)
    print(f"device: {device.device_kind}  (peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s)",
          flush=True)
    model = planned_model(configs.load(args.config).model)
    model_flops, six_n = lora_step_flops(model, args.seq, SyntheticData().answer_fraction)
    for case in args.cases.split(","):
        batch, remat, attention = case.split(":")
        experiment = _experiment(model, base=None, steps=args.steps + 2, batch=int(batch), seq=args.seq,
                                 remat=remat, attention=attention)
        try:
            tps, step = _time_jax(experiment, args.steps)
        except Exception as err:  # report the case and go on (e.g. out of memory)
            print(f"{case}: failed: {str(err).splitlines()[0][:300]}", flush=True)
            continue
        stats = device.memory_stats() or {}
        peak_gb = stats.get("peak_bytes_in_use", 0) / 2**30
        mfu = tps * model_flops / peak if peak else float("nan")
        mfu6 = tps * six_n / peak if peak else float("nan")
        print(f"{case}: {tps:9.0f} tokens/s  {step:.3f} s/step  peak memory {peak_gb:.1f} GiB  "
              f"MFU {100 * mfu:.1f}% (LoRA step FLOPs)  {100 * mfu6:.1f}% (6N convention)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    parser.add_argument("--gpu-7b", action="store_true", help="time the EmoLA-7B step on the accelerator instead")
    parser.add_argument("--config", default="emola_7b", help="--gpu-7b: the model config (tiny for a dry run)")
    parser.add_argument("--cases", default="8:full:cudnn,8:full:xla,16:full:cudnn",
                        help="--gpu-7b: comma-separated batch:remat:attention cases")
    args = parser.parse_args()
    if args.gpu_7b:
        args.seq = args.seq or 2048
        gpu_7b(args)
    else:
        args.seq = args.seq or 1024
        cpu(args)


if __name__ == "__main__":
    main()
