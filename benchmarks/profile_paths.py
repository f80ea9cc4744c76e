"""Where the milliseconds go: the LoRA train step, the prefill and one decode step, this project
beside the PyTorch reference on the same mid-size model and shapes (`midsize.py`), by category.

JAX side: `jax.profiler.trace` records one event per executed XLA:CPU thunk (`hlo_op`,
`hlo_module`); the optimised HLO of every compiled module (`--xla_dump_to`) gives each op its opcode,
the ops it fuses and its source stack frames, from which the category is read (a dot inside the
LoRA line of `Linear.__call__` is a LoRA GEMM, anything under `image_features` is the vision tower,
anything under optax is the optimiser, a fusion of only copies/transposes/slices is layout...).
PyTorch side: `torch.profiler` with shapes; each op's self time goes to a category by its name, its
shapes (a GEMM with the LoRA rank in its shapes is LoRA's, one with the vocabulary is the head's)
and its ancestors (forward hooks name the vision tower; the optimiser step names itself).

Both sides: float32, 2 threads, LoRA r=64 with dropout 0, the train step of
`train_throughput.py` (sequence 1024, batch 2), the prefill and decode of `decode_throughput.py`
(batch 8, 512-token prompt). Milliseconds are summed op times; the wall time of the profiled call
is printed beside them (on XLA:CPU independent ops may overlap on the two cores, so their sum can
exceed the wall time; the rest of the wall time is runtime outside ops).

    python benchmarks/profile_paths.py [--paths train,prefill,decode] [--new 16] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import linecache
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DUMP = Path(tempfile.mkdtemp(prefix="xla_dump_"))
os.environ["JAX_TRACEBACK_IN_LOCATIONS_LIMIT"] = "-1"  # whole stacks in the HLO's frames, not the last 10
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP} --xla_dump_hlo_as_text".strip()

CATEGORIES = ("big GEMMs", "LoRA GEMMs", "attention", "norms and elementwise", "loss and head",
              "copies and layout", "vision tower and projector", "optimizer and step", "embedding and sampling",
              "other")
LORA_RANK = 64
VOCAB = 32000
LAYOUT_OPS = {"copy", "transpose", "concatenate", "dynamic-update-slice", "dynamic-slice", "slice", "pad",
              "copy-start", "copy-done", "reverse"}
FREE_OPS = {"parameter", "constant", "bitcast", "reshape", "broadcast", "tuple", "get-tuple-element", "iota"}
CONTROL_OPS = {"while", "conditional", "call"}
ATTENTION_FUNCTIONS = {"heads_first_attention", "causal_blockwise_attention", "causal_attention", "splash_attention",
                       "dot_product_attention", "cached_attention_mask", "attention_mask_4d"}
ELEMENTWISE_FUNCTIONS = {"apply_rope", "rope_cos_sin", "_feed_forward", "silu"}


# ----------------------------------------------------------------------------------------- JAX side

class HloModule:
    """Ops of one optimised HLO module: name -> (opcode, ops it fuses, source frames innermost first)."""

    INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")

    def __init__(self, text: str):
        self.files = self._table(text, "FileNames", r'(\d+) "(.*)"')
        self.functions = self._table(text, "FunctionNames", r'(\d+) "(.*)"')
        self.locations = {k: re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v).groups()
                          for k, v in self._table(text, "FileLocations", r"(\d+) \{(.*)\}").items()}
        self.frames = {k: re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", v).groups()
                       for k, v in self._table(text, "StackFrames", r"(\d+) \{(.*)\}").items()}
        self.computations: dict[str, list[tuple[str, str, str]]] = {}
        current = None
        for line in text.splitlines():
            header = re.match(r"^(?:ENTRY )?%(\S+) \(.*\{$", line)
            if header:
                current = self.computations.setdefault(header.group(1), [])
            elif current is not None and (m := self.INSTRUCTION.match(line)):
                name, kind, opcode, rest = m.groups()
                current.append((name, opcode, f"{rest} result={kind.split('{')[0]}"))
        self.ops = {name: (opcode, rest) for body in self.computations.values() for name, opcode, rest in body}

    @staticmethod
    def _table(text: str, title: str, pattern: str) -> dict[str, str]:
        block = re.search(rf"^{title}\n(.*?)\n\n", text, re.S | re.M)
        return dict(re.findall(pattern, block.group(1))) if block else {}

    def source(self, rest: str) -> list[tuple[str, str, str]]:
        """(file, function, source line) per frame, innermost first."""
        m = re.search(r"stack_frame_id=(\d+)", rest)
        frame, out, seen = (m.group(1) if m else None), [], set()
        while frame and frame in self.frames and frame not in seen:
            seen.add(frame)
            location, parent = self.frames[frame]
            file_id, function_id, line = self.locations[location]
            path = self.files.get(file_id, "")
            out.append((path, self.functions.get(function_id, ""), linecache.getline(path, int(line)).strip()))
            frame = str(int(parent) - 1)  # printed one above the parent's id; 0: no parent
        return out

    def inner(self, rest: str) -> list[tuple[str, str]]:
        """(opcode, rest) of the ops a fusion calls (the op itself otherwise)."""
        called = re.search(r"calls=%(\S+?)[,\s}]", rest + " ")
        if not called or called.group(1) not in self.computations:
            return []
        ops = []
        for _, opcode, body in self.computations[called.group(1)]:
            ops.extend(self.inner(body) if opcode == "fusion" else [(opcode, body)])
        return ops

    def dot_flops(self, rest: str) -> float:
        """2 * output elements * contracted size of a dot (`rest` as `inner` gives it)."""
        lhs = re.match(r"%(\S+?)[,)]", rest).group(1)
        contracting = [int(d) for d in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1).split(",") if d]
        lhs_dims = self._dims(self.ops[lhs][1])
        out_dims = self._dims(rest)
        return 2.0 * np.prod(out_dims) * np.prod([lhs_dims[d] for d in contracting])

    @staticmethod
    def _dims(rest: str) -> list[int]:
        shape = re.search(r"result=\w+\[([\d,]*)\]", rest)
        return [int(d) for d in shape.group(1).split(",") if d] if shape else []

    def describe(self, name: str) -> str:
        """The op's opcode, or its dots' output shapes."""
        opcode, rest = self.ops[name]
        dots = [body.rsplit("result=", 1)[-1] for o, body in self.inner(rest) if o == "dot"]
        return f"dot -> {', '.join(dots)}" if dots else opcode

    def classify(self, name: str) -> list[tuple[str, str, float]]:
        """(category, phase, share) of op `name`: one entry, or one per dot of a fusion of several
        (shares by FLOPs; the fusion's elementwise work is charged to its dots). The phase is
        `decode` inside the decode loop (`generate._decode_loop`), else ""."""
        opcode, rest = self.ops[name]
        inner = self.inner(rest) or [(opcode, rest)]
        work = [(o, r) for o, r in inner if o not in FREE_OPS]
        dots = [r for o, r in work if o == "dot"]
        if dots:
            flops = [self.dot_flops(r) for r in dots]
            return [(*self._category(self.source(r), "dot", False), f / sum(flops))
                    for r, f in zip(dots, flops, strict=True)]
        main = next(((o, r) for o, r in work if o in ("convolution", "custom-call")), None)
        main = main or (work[-1] if work else (opcode, rest))
        layout = bool(work) and all(o in LAYOUT_OPS for o, _ in work)
        return [(*self._category(self.source(main[1]) or self.source(rest), main[0], layout), 1.0)]

    @staticmethod
    def _category(frames, opcode: str, layout: bool) -> tuple[str, str]:
        qualified = {fn for _, fn, _ in frames}
        functions = {fn.rsplit(".", 1)[-1] for fn in qualified}
        files = [f for f, _, _ in frames]
        phase = "decode" if qualified & {"_decode_loop.<locals>.body", "_decode_loop.<locals>.cond"} else ""
        if layout:
            return "copies and layout", phase
        if any("/optax/" in f for f in files) or (functions & {"step", "micro_step"} and not functions & {"loss_fn"}):
            return "optimizer and step", phase
        if any(f.endswith("clip.py") for f in files) or functions & {"image_features", "prior_tokens"}:
            return "vision tower and projector", phase
        if functions & {"token_cross_entropy", "_chunk_loss", "_chunk_loss_fwd", "_chunk_loss_bwd",
                        "_chunk_loss_and_grads", "logits"}:
            return "loss and head", phase
        if functions & ATTENTION_FUNCTIONS:
            return "attention", phase
        if opcode == "dot":
            linear = next((text for _, fn, text in frames if fn == "Linear.__call__"), "")
            return ("LoRA GEMMs" if "@ a)" in linear or "lora" in linear else "big GEMMs"), phase
        if functions & {"sample_next", "embed", "scatter_image_embeddings"} or any("Embed." in fn for fn in qualified):
            return "embedding and sampling", phase
        if any(f.endswith(("llama.py", "layers.py", "rope.py")) for f in files) or functions & ELEMENTWISE_FUNCTIONS:
            return "norms and elementwise", phase
        return "other", phase


def wall_shares(spans: list[tuple[float, float, tuple]]) -> collections.Counter:
    """Milliseconds of wall time per key: while n ops run at once, each is charged 1/n of the time,
    so the shares add up to the time any op was running (not to the sum of overlapping durations)."""
    edges = sorted([(start, 1, i) for i, (start, _, _) in enumerate(spans)] +
                   [(end, -1, i) for i, (_, end, _) in enumerate(spans)], key=lambda e: (e[0], e[1]))
    shares: collections.Counter = collections.Counter()
    active: set[int] = set()
    last = None
    for time_us, kind, index in edges:
        if active and last is not None and time_us > last:
            for i in active:
                shares[spans[i][2]] += (time_us - last) / len(active) / 1000
        last = time_us
        (active.add if kind == 1 else active.discard)(index)
    return shares


def _modules(files: list[Path]) -> dict[str, HloModule]:
    out = {}
    for path in files:
        name = path.name.split(".")[1]
        out[name] = HloModule(path.read_text())
    return out


def jax_profile(fn, label: str, top: int) -> dict[str, dict[str, float]]:
    """Runs `fn` (compiled already: its modules are read from the dump) under the profiler; returns
    {phase: {category: milliseconds}} with phase "" for ops outside a decode loop."""
    import jax

    modules = _modules(sorted(DUMP.glob("*after_optimizations.txt")))  # the latest module of a name wins
    trace = Path(tempfile.mkdtemp(prefix="trace_"))
    start = time.perf_counter()
    with jax.profiler.trace(str(trace), create_perfetto_trace=True):
        fn()
    wall = time.perf_counter() - start
    events = json.load(gzip.open(next(trace.rglob("perfetto_trace.json.gz"))))
    events = events["traceEvents"] if isinstance(events, dict) else events
    spans, keys = [], {}
    for event in events:
        args = event.get("args", {})
        module = modules.get(args.get("hlo_module", ""))
        if event.get("ph") != "X" or module is None or args.get("hlo_op") not in module.ops:
            continue
        name = args["hlo_op"]
        if module.ops[name][0] in CONTROL_OPS:
            continue  # its body's ops are counted themselves
        key = (args["hlo_module"], name)
        if key not in keys:
            keys[key] = (module.classify(name), module.describe(name))
        spans.append((event["ts"], event["ts"] + event["dur"], key))
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ops: collections.Counter = collections.Counter()
    for key, ms in wall_shares(spans).items():
        parts, what = keys[key]
        for category, phase, share in parts:
            totals[phase][category] += ms * share
        ops[(parts[0][1], "+".join(sorted({c for c, _, _ in parts})), key[1], what[:90])] += ms
    print(f"[jax {label}] wall {wall * 1000:.0f} ms under the profiler; top ops:")
    for (phase, category, name, what), ms in ops.most_common(top):
        print(f"    {ms:9.1f} ms  {phase or '-':6s} {category:28s} {name:22s} {what}")
    return {phase: dict(c) for phase, c in totals.items()} | {"wall": {"ms": wall * 1000}}


# ------------------------------------------------------------------------------------- PyTorch side

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}
TORCH_LAYOUT = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::index_copy_", "aten::_to_copy",
                "aten::to", "aten::transpose", "aten::t", "aten::permute", "aten::expand", "aten::view",
                "aten::reshape", "aten::_unsafe_view", "aten::slice", "aten::select", "aten::as_strided",
                "aten::unsqueeze", "aten::squeeze", "aten::stack", "aten::index_select", "aten::narrow", "aten::fill_",
                "aten::zero_", "aten::zeros", "aten::empty", "aten::empty_like", "aten::new_zeros",
                "aten::empty_strided", "aten::resize_", "aten::detach", "aten::alias", "aten::split", "aten::chunk",
                "aten::index", "aten::flatten", "aten::new_empty", "aten::zeros_like", "aten::full"}
TORCH_ELEMENTWISE = ("add", "mul", "sub", "div", "silu", "pow", "mean", "rsqrt", "neg", "sum", "gelu", "sigmoid",
                     "where", "masked_fill", "exp", "tanh", "sqrt", "threshold", "addcmul", "addcdiv", "lerp", "norm",
                     "clamp", "maximum", "minimum", "cos", "sin", "bitwise", "eq", "ne", "lt", "gt", "le", "ge",
                     "arange", "cumsum", "any", "all", "reciprocal", "ones", "scalar_tensor", "foreach")


def torch_category(event, ancestors: list[str]) -> str:
    name = event.name
    shapes = [tuple(s) for s in (event.input_shapes or []) if s]
    dims = {d for s in shapes for d in s}
    if any(a.startswith(("Optimizer.", "clip_grad")) for a in ancestors):
        return "optimizer and step"
    if "vision tower" in ancestors:
        return "vision tower and projector"
    if "scaled_dot_product" in name or any("scaled_dot_product" in a or "Sdpa" in a for a in ancestors):
        return "attention"
    if "nll_loss" in name or "log_softmax" in name or "cross_entropy" in name or any(
            "NllLoss" in a or "LogSoftmax" in a for a in ancestors):
        return "loss and head"
    if name in GEMM_OPS or "MmBackward" in name or "AddmmBackward" in name:
        if VOCAB in dims:
            return "loss and head"
        if LORA_RANK in dims:
            return "LoRA GEMMs"
        if 256 in dims:  # the mid-size CLIP's width: the projector's input (its backward in training)
            return "vision tower and projector"
        return "big GEMMs"
    if name in TORCH_LAYOUT:
        return "copies and layout"
    if name in ("aten::embedding", "aten::argmax", "aten::embedding_dense_backward", "aten::masked_scatter"):
        return "embedding and sampling"
    if name.startswith("aten::") and any(word in name for word in TORCH_ELEMENTWISE):
        return "norms and elementwise"
    return "other"


def torch_profile(fn, label: str, top: int, prefill_range: str | None = None) -> dict[str, dict[str, float]]:
    """Runs `fn` under torch.profiler; {phase: {category: milliseconds of self CPU time}}. With
    `prefill_range` (the name of the first forward's range), the ops that start before that range ends
    are phase "" (the vision tower runs before the first forward in transformers' `generate`), the
    others "decode"."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    wall = time.perf_counter() - start
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ops: collections.Counter = collections.Counter()
    events = prof.events()
    prefill = next((e.time_range for e in events if e.name == prefill_range), None)
    for event in events:
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        category = torch_category(event, ancestors)
        inside = prefill is None or event.time_range.start < prefill.end
        phase = "" if inside else "decode"
        ms = event.self_cpu_time_total / 1000
        if event.name.startswith(("Optimizer.", "clip_grad", "vision tower", "forward ", "autograd::engine")):
            category = "other" if not event.name.startswith(("Optimizer.", "clip_grad")) else category
        totals[phase][category] += ms
        ops[(phase, category, event.name, str(event.input_shapes)[:60])] += ms
    print(f"[torch {label}] wall {wall * 1000:.0f} ms under the profiler; top ops:")
    for (phase, category, name, shapes), ms in ops.most_common(top):
        print(f"    {ms:9.1f} ms  {phase or '-':6s} {category:28s} {name:40s} {shapes}")
    return {phase: dict(c) for phase, c in totals.items()} | {"wall": {"ms": wall * 1000}}


def _name_forwards(module, name: str, numbered: bool = False):
    """Forward hooks that open a `record_function` around each call of `module` (numbered calls:
    `forward 0`, `forward 1`, ...), so that its ops can be told apart in the profile."""
    import torch

    open_ranges, calls = [], [0]

    def pre(*_):
        label = f"{name} {calls[0]}" if numbered else name
        calls[0] += 1
        open_ranges.append(torch.autograd.profiler.record_function(label).__enter__())

    def post(*_):
        open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)
    return calls


# ------------------------------------------------------------------------------------------- paths

def train_paths(args, tmp: Path, results: dict) -> None:
    import midsize
    import torch
    from peft import LoraConfig, get_peft_model
    from train_throughput import LORA_TARGETS, _experiment
    from transformers import LlavaForConditionalGeneration

    from converters import convert
    from emola_jax.checkpoint import load_config
    from emola_jax.config import LoRAConfig
    from emola_jax.data.synthetic import SyntheticData, SyntheticLoader, make_batch
    from emola_jax.train.loop import Trainer, next_batch

    torch.manual_seed(0)
    reference = LlavaForConditionalGeneration(midsize.llava_config())
    reference.save_pretrained(tmp / "hf")
    convert(tmp / "hf", tmp / "base", progress=False)
    model = load_config(tmp / "base").replace(lora=LoRAConfig(rank=LORA_RANK, alpha=128.0), prior_position="off")
    trainable = ((r"language_model/.*/lora_[ab]", 1e-4), (r"multi_modal_projector/.*", 2e-5))
    experiment = _experiment(model, base=str(tmp / "base"), steps=10, batch=2, seq=1024, remat="none",
                             attention="auto", trainable=trainable)
    trainer = Trainer(experiment)
    loader = SyntheticLoader(experiment.data, trainer.config)
    batches = iter([next_batch(loader, 1) for _ in range(3)])
    float(trainer.step(next(batches))["loss"])  # warm-up outside the profile: compiles
    results["train"]["jax"] = jax_profile(lambda: float(trainer.step(next(batches))["loss"]), "train step", args.top)

    targets = rf".*language_model.*\.({'|'.join(LORA_TARGETS)})"
    peft_model = get_peft_model(reference, LoraConfig(r=LORA_RANK, lora_alpha=128, lora_dropout=0.0,
                                                      target_modules=targets))
    for name, param in peft_model.named_parameters():
        if "multi_modal_projector" in name:
            param.requires_grad_(True)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    peft_model.train()
    base = peft_model.base_model.model.model
    _name_forwards(base.vision_tower, "vision tower")
    _name_forwards(base.multi_modal_projector, "vision tower")
    data = SyntheticData(batch_size=2, seq_length=1024)

    def torch_step(index: int) -> None:
        batch = make_batch(data, model, index)
        out = peft_model(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
                         pixel_values=torch.tensor(batch.pixel_values).permute(0, 3, 1, 2),
                         attention_mask=torch.tensor(batch.attention_mask),
                         labels=torch.tensor(batch.labels, dtype=torch.long))
        out.loss.backward()
        with torch.autograd.profiler.record_function("clip_grad_norm"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch_step(0)
    results["train"]["torch"] = torch_profile(lambda: torch_step(1), "train step", args.top)


def generate_paths(args, tmp: Path, results: dict) -> None:
    import jax
    import midsize
    import torch
    from transformers import LlavaForConditionalGeneration

    import emola_jax
    from converters import convert
    from emola_jax.generate import GenerationConfig, generate

    torch.manual_seed(0)
    reference = LlavaForConditionalGeneration(midsize.llava_config()).eval()
    reference.save_pretrained(tmp / "hf_gen")
    model, _ = emola_jax.load_pretrained(convert(tmp / "hf_gen", tmp / "jax_gen", progress=False))
    batch, image_tokens = 8, 256
    rng = np.random.default_rng(0)
    text = rng.integers(3, 31000, (batch, 512 - image_tokens))
    ids = np.concatenate([text[:, :8], np.full((batch, image_tokens), midsize.IMAGE_TOKEN), text[:, 8:]], axis=1)
    mask = np.ones_like(ids)
    pixels = rng.standard_normal((batch, 224, 224, 3)).astype(np.float32)
    gen = GenerationConfig(max_new_tokens=args.new, eos_token_id=-1, pad_token_id=0)
    run_jax = lambda: np.asarray(generate(model, ids.astype(np.int32), pixels, mask.astype(np.int32), None,  # noqa: E731
                                          jax.random.key(0), gen))
    run_jax()  # compiles
    results["generate"]["jax"] = jax_profile(run_jax, "generate", args.top)

    calls = _name_forwards(reference, "forward", numbered=True)
    _name_forwards(reference.model.vision_tower, "vision tower")
    _name_forwards(reference.model.multi_modal_projector, "vision tower")

    def run_torch():
        with torch.no_grad():
            reference.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                               attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=args.new,
                               min_new_tokens=args.new, pad_token_id=0)

    run_torch()
    # The profiled call's first forward is its prefill; the rest, and the loop between, decode.
    results["generate"]["torch"] = torch_profile(run_torch, "generate", args.top, f"forward {calls[0]}")


def table(title: str, columns: dict[str, dict[str, float]], divide: dict[str, float]) -> None:
    print(f"\n{title}")
    print("| category | " + " | ".join(f"{k} (ms)" for k in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for category in (*CATEGORIES, "total (sum of ops)"):
        cells = []
        for name, values in columns.items():
            value = sum(values.values()) if category.startswith("total") else values.get(category, 0.0)
            cells.append(f"{value / divide[name]:.1f}")
        print(f"| {category} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="train,generate", help="comma-separated: train, generate")
    parser.add_argument("--new", type=int, default=16, help="new tokens of the profiled generation")
    parser.add_argument("--top", type=int, default=12, help="the heaviest ops printed per side and path")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = collections.defaultdict(dict)
    with tempfile.TemporaryDirectory() as tmp:
        if "train" in args.paths:
            train_paths(args, Path(tmp), results)
        if "generate" in args.paths:
            generate_paths(args, Path(tmp), results)
    if "train" in results:
        r = results["train"]
        table(f"train step (wall: jax {r['jax']['wall']['ms']:.0f} ms, torch {r['torch']['wall']['ms']:.0f} ms)",
              {"jax": r["jax"][""], "torch": r["torch"][""]}, {"jax": 1, "torch": 1})
    if "generate" in results:
        r = results["generate"]
        table("prefill (batch 8 x 512 tokens, vision tower included)",
              {"jax": r["jax"].get("", {}), "torch": r["torch"].get("", {})}, {"jax": 1, "torch": 1})
        steps = args.new - 1
        table(f"one decode step (mean of {steps}, batch 8)",
              {"jax": r["jax"].get("decode", {}), "torch": r["torch"].get("decode", {})},
              {"jax": steps, "torch": steps})


if __name__ == "__main__":
    main()
