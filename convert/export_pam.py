"""`pam-jax convert pam --export MODEL_DIR OUT_DIR [--dtype keep|float32|bfloat16]`.

The inverse of `convert pam`: a pam-jax PAM model directory (converted, or exported by
`pam-jax train`) -> the official release layout, so that a model trained here loads in the
official PyTorch code (`llava.model.builder.load_pretrained_model`). `pam-jax convert sam2
--export SAM2_DIR OUT.pt` writes the SAM 2 part alone, the same way.

    OUT_DIR/config.json                       LLaVA-Qwen (model_type llava_qwen): the release
                                              config.json the model was converted from (kept when
                                              its LLM fields match the model), else one built from
                                              the model's config with the release's mm_* fields
    OUT_DIR/generation_config.json            the model's (a converted release: Qwen2.5-Instruct's),
                                              else one from the LLM config's token ids
    OUT_DIR/model-0000K-of-0000N.safetensors  the tensors below, split at `max_shard_size`
    OUT_DIR/model.safetensors.index.json      {"metadata": {"total_size"}, "weight_map"}, always
    OUT_DIR/tokenizer files                   MODEL_DIR/llm's, with `<|im_start|>` / `<|im_end|>`
                                              listed in `additional_special_tokens` of
                                              tokenizer_config.json (and special_tokens_map.json):
                                              the release's `preprocess_qwen` reads them there
    OUT_DIR/sam2.pt                           SAM 2 as Meta ships it: torch.save({"model": sd})

Release keys, each table derived from the importer's own rules (no second hand-written copy):

    model.embed_tokens.weight, model.layers.N.*,     MODEL_DIR/llm: `llm.weights.hf_key` (Linear
    model.norm.weight, [lm_head.weight]             kernels transposed back; lm_head only untied)
    model.vision_resampler.*, model.mm_projector_   MODEL_DIR/model.safetensors:
    {img,semT}.{0,2}.*, model.{image,semT,frame}_   `torch_nnx.nnx_to_torch_table` of PAMParts
    newline
    model.vision_tower.sam2_model_predictor.*       MODEL_DIR/sam2: `nnx_to_torch_table` of
                                                    SAM2Base (the keys of Meta's .pt), as the
                                                    release stores its SAM 2 copy

Any tensor of the model directory without a rule, any missing or misshapen one, stops the export
listing all of them, before anything is written. The vocabulary is exported at the model's size
(the release trains over the padded 151936; the inference loader's cut does not apply).

`sam2.pt` is always written: the release's loader ignores the SAM 2 copy inside the safetensors
and reads `llava/model/multimodal_encoder/sam2.1_hiera_large.pt`, so a fine-tuned SAM 2 reaches
the official code only by copying `sam2.pt` there (an unchanged SAM 2 is Meta's file again).
Re-import with `pam-jax convert pam OUT_DIR --sam2 OUT_DIR/sam2.pt MODEL_DIR2`.

`--dtype`: `keep` writes every tensor in its stored dtype (LLM as converted or trained, parts and
SAM 2 float32); `float32` / `bfloat16` / `float16` cast every floating tensor, in the safetensors
and in sam2.pt alike. config.json's `torch_dtype` is the written LLM dtype. Tensors stream one
at a time (sam2.pt is built in memory: about 0.9 GB for SAM 2.1-L in float32).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
from pam_jax.convert.llm import out_dtype
from pam_jax.convert.torch_nnx import nnx_to_torch_table, short_list

from pam_jax.checkpoint import WEIGHTS_FILE, CheckpointError, read_model_config
from pam_jax.llm.config import Qwen2Config
from pam_jax.llm.io import copy_tokenizer_files
from pam_jax.llm.io import read_config as read_llm_config
from pam_jax.llm.weights import SafetensorsFile, expected_params, hf_key, write_safetensors

SAM2_PREFIX = "model.vision_tower.sam2_model_predictor."
PARTS_PREFIX = "model."
SAM2_PT = "sam2.pt"
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
MAX_SHARD_SIZE = 5_000_000_000  # transformers' save_pretrained default ("5GB")
CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")
# mm_* fields of a LLaVA-Qwen config that the release's model builder reads
RELEASE_MM_FIELDS = {
    "mm_vision_tower": "sam2",  # build_vision_tower: "sam2" in the name -> SAM2VisionTower
    "mm_use_im_patch_token": False,  # else load_pretrained_model adds an <im_patch> token
    "mm_use_im_start_end": False,
}
_TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclasses.dataclass(frozen=True)
class ExportTensor:
    """One tensor of the release: its key, torch-layout shape, written dtype and a reader."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype  # as written
    read: Callable[[], np.ndarray]  # release layout, stored dtype (cast on write)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def value(self) -> np.ndarray:
        return np.ascontiguousarray(self.read(), dtype=self.dtype)


@dataclasses.dataclass(frozen=True)
class ReleasePlan:
    """Everything an export writes, validated: the tensors and the JSON files."""

    llm: list[ExportTensor]
    parts: list[ExportTensor]
    sam2: list[ExportTensor]  # Meta's keys (no prefix): sam2.pt; prefixed in the safetensors
    config: dict
    generation_config: dict | None  # None: copied with the tokenizer files
    llm_dir: Path

    def release_tensors(self) -> list[ExportTensor]:
        """The safetensors' tensors in the order of the release's state dict."""
        tower = [dataclasses.replace(e, key=SAM2_PREFIX + e.key) for e in self.sam2]
        head = [e for e in self.llm if e.key == "lm_head.weight"]
        return [e for e in self.llm if e not in head] + tower + self.parts + head


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16)


def _written(stored: np.dtype, out_dt: np.dtype | None) -> np.dtype:
    return out_dt if out_dt is not None and _is_float(stored) else stored


def _open(f: Path, what: str) -> SafetensorsFile:
    if not f.is_file():
        raise CheckpointError(f"{f.parent} has no {f.name} ({what})")
    return SafetensorsFile(f)


def _layout_shape(layout: Callable[[np.ndarray], np.ndarray], shape: tuple) -> tuple[int, ...]:
    """The torch-layout shape of an NNX shape, without allocating (a zero-stride view)."""
    return tuple(layout(np.broadcast_to(np.zeros((), np.uint8), shape)).shape)


def _check_keys(have: dict, want: dict, what: str) -> list[str]:
    """Error strings: tensors without an export rule, missing ones, misshapen ones."""
    errors = []
    if unknown := sorted(set(have) - set(want)):
        errors.append(
            f"{len(unknown)} tensors of {what} have no export rule: {short_list(unknown)}"
        )
    if missing := sorted(set(want) - set(have)):
        errors.append(f"{len(missing)} tensors missing from {what}: {short_list(missing)}")
    if bad := [f"{k}: {have[k]} != {want[k]}" for k in sorted(set(have) & set(want)) if
               tuple(have[k]) != tuple(want[k])]:  # fmt: skip
        errors.append(f"{len(bad)} misshapen tensors in {what}: {short_list(bad)}")
    return errors


def module_entries(
    abstract, src: SafetensorsFile, out_dt: np.dtype | None, what: str, errors: list[str]
) -> list[ExportTensor]:
    """Torch-keyed tensors of a module's NNX-keyed file, through `nnx_to_torch_table`."""
    from flax import nnx

    from pam_jax.checkpoint import path_key

    shapes = {path_key(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract))}
    errors += _check_keys({k: src.shape(k) for k in src.keys()}, shapes, what)
    table = nnx_to_torch_table(abstract)
    out = []
    for k, (tk, layout) in table.items():
        if k not in src.header:
            continue  # reported above

        def read(k=k, layout=layout):
            return layout(src.get(k))

        dt = _written(src.dtype(k), out_dt)
        out.append(ExportTensor(tk, _layout_shape(layout, shapes[k]), dt, read))
    return out


def llm_entries(
    llm_dir: Path, cfg: Qwen2Config, out_dt: np.dtype | None, errors: list[str]
) -> list[ExportTensor]:
    """HF-keyed LLM tensors through `llm.weights.hf_key` (kernels transposed back)."""
    src = _open(llm_dir / WEIGHTS_FILE, "the LLM weights")
    want = expected_params(cfg)
    errors += _check_keys({k: src.shape(k) for k in src.keys()}, want, f"{llm_dir}")
    out = []
    for k, shape in want.items():
        if k not in src.header:
            continue
        hk, t = hf_key(k)

        def read(k=k, t=t):
            w = src.get(k)
            return w.T if t else w

        out.append(
            ExportTensor(hk, shape[::-1] if t else shape, _written(src.dtype(k), out_dt), read)
        )
    return out


def sam2_entries(sam2_dir: Path, out_dt: np.dtype | None, errors: list[str]) -> list[ExportTensor]:
    """Meta's state-dict keys of a SAM 2 model directory (the keys `convert sam2` reads)."""
    from pam_jax.convert.sam2 import KIND, abstract_sam2

    from pam_jax.sam2.config import SAM2Config

    meta = read_model_config(sam2_dir, KIND)
    try:
        cfg = SAM2Config.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{sam2_dir}: invalid SAM 2 config: {e}") from None
    src = _open(sam2_dir / WEIGHTS_FILE, "the SAM 2 weights")
    return module_entries(abstract_sam2(cfg), src, out_dt, str(sam2_dir), errors)


def _llm_release_fields(cfg: Qwen2Config) -> dict:
    hf = cfg.to_hf()
    for k in ("architectures", "model_type", "torch_dtype"):
        hf.pop(k)
    return hf


def release_config(meta: dict, pam_cfg, llm_cfg: Qwen2Config, log: Callable[[str], None]) -> dict:
    """config.json: the source release's when its LLM fields match, else built from the model."""
    base = meta.get("release_config")
    if isinstance(base, dict):
        try:
            same = (
                Qwen2Config.from_hf(
                    {**base, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
                ).to_hf()
                == llm_cfg.to_hf()
            )
        except (CheckpointError, KeyError, TypeError, ValueError):
            same = False
        if same:
            return dict(base)
        log("note: the release config.json the model came from no longer matches its LLM; "
            "its LLM fields are rewritten from the model")  # fmt: skip
        return {**base, **_llm_release_fields(llm_cfg)}
    return {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        **_llm_release_fields(llm_cfg),
        "mm_hidden_size": pam_cfg.mm_hidden_size,
        "mm_projector_type": pam_cfg.mm_projector_type,
        **RELEASE_MM_FIELDS,
    }


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not readable JSON: {e}") from None


def _check_tokenizer(llm_dir: Path) -> None:
    """The release needs the tokenizer files, with the ChatML specials as tokens."""
    f = llm_dir / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(
            f"{llm_dir} has no tokenizer.json: the release layout carries the tokenizer "
            "(the official loader and preprocess_qwen read it)"
        )
    tok = _read_json(f)
    have = {t.get("content") for t in tok.get("added_tokens") or []}
    have |= set((tok.get("model") or {}).get("vocab") or {})
    if missing := [t for t in CHATML_SPECIALS if t not in have]:
        raise CheckpointError(
            f"{f} has no {' / '.join(missing)} token: the release's preprocess_qwen needs "
            "the ChatML specials <|im_start|> and <|im_end|>"
        )


def _token_name(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


def list_chatml_specials(out: Path) -> None:
    """Add <|im_start|> / <|im_end|> to `additional_special_tokens` of the tokenizer files
    (kept first-seen order; existing entries untouched)."""
    cfg_file = out / "tokenizer_config.json"
    cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")  # tokenizer.json alone loads
    files = [(cfg_file, cfg)]
    if (m := out / "special_tokens_map.json").is_file():
        files.append((m, _read_json(m)))
    for path, d in files:
        extra = list(d.get("additional_special_tokens") or [])
        names = {_token_name(t) for t in extra}
        extra += [t for t in CHATML_SPECIALS if t not in names]
        d["additional_special_tokens"] = extra
        path.write_text(json.dumps(d, indent=2, ensure_ascii=False))


def plan_export(
    model_dir: str | os.PathLike,
    dtype: str | None = None,
    log: Callable[[str], None] = print,
) -> ReleasePlan:
    """Read and validate a PAM model directory; raises CheckpointError listing every problem."""
    from flax import nnx

    from pam_jax.pam.config import PAMConfig
    from pam_jax.pam.model import PAMParts

    d = Path(model_dir)
    meta = read_model_config(d, "pam")
    try:
        pam_cfg = PAMConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d}: invalid PAM config: {e}") from None
    out_dt = out_dtype(dtype)
    llm_dir = d / meta.get("llm_dir", "llm")
    llm_cfg = read_llm_config(llm_dir)
    if llm_cfg.hidden_size != pam_cfg.hidden_size:
        raise CheckpointError(
            f"{llm_dir} is {llm_cfg.hidden_size} wide, the PAM config {pam_cfg.hidden_size}"
        )
    _check_tokenizer(llm_dir)
    errors: list[str] = []
    llm = llm_entries(llm_dir, llm_cfg, out_dt, errors)
    abstract = nnx.eval_shape(lambda: PAMParts(pam_cfg, rngs=nnx.Rngs(0)))
    parts_src = _open(d / WEIGHTS_FILE, "PAM's own parts")
    parts = module_entries(abstract, parts_src, out_dt, f"{d / WEIGHTS_FILE}", errors)
    parts = [dataclasses.replace(e, key=PARTS_PREFIX + e.key) for e in parts]
    sam2 = sam2_entries(d / meta.get("sam2_dir", "sam2"), out_dt, errors)
    if errors:
        raise CheckpointError(f"cannot export {d}: " + "; ".join(errors))

    cfg = release_config(meta, pam_cfg, llm_cfg, log)
    embed = next(e for e in llm if e.key == "model.embed_tokens.weight")
    cfg["torch_dtype"] = _TORCH_DTYPE_NAMES.get(embed.dtype.name, "float32")
    gen = None
    if not (llm_dir / "generation_config.json").is_file():
        gen = {k: getattr(llm_cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        gen = {k: v for k, v in gen.items() if v is not None}
    return ReleasePlan(llm, parts, sam2, cfg, gen, llm_dir)


def shard(entries: Sequence[ExportTensor], max_bytes: int) -> list[list[ExportTensor]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[ExportTensor]] = []
    size = 0
    for e in entries:
        if not shards or (size + e.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_safetensors_shards(
    out: Path, entries: Sequence[ExportTensor], max_bytes: int = MAX_SHARD_SIZE
) -> dict:
    """The shards and their index (transformers' layout, metadata format "pt"); the index."""
    groups = shard(entries, max_bytes)
    weight_map = {}
    for i, group in enumerate(groups):
        name = SHARD_NAME.format(i + 1, len(groups))
        by_key = {e.key: e for e in group}
        write_safetensors(
            out / name, [(e.key, e.dtype, e.shape) for e in group],
            lambda k, by_key=by_key: by_key[k].value(), {"format": "pt"},
        )  # fmt: skip
        weight_map.update({e.key: name for e in group})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return index


def write_sam2_pt(path: Path, entries: Sequence[ExportTensor]) -> Path:
    """`torch.save({"model": state_dict})`, Meta's checkpoint format."""
    from pam_jax.convert.sam2 import _import_torch

    torch = _import_torch()
    sd = {}
    for e in entries:
        a = np.array(e.value(), copy=True)  # writable, owned
        if a.dtype == np.dtype(ml_dtypes.bfloat16):
            sd[e.key] = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            sd[e.key] = torch.from_numpy(a)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"model": sd}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_pam(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: int = MAX_SHARD_SIZE,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the official release layout of a PAM model directory into `out_dir` (see the
    module docstring); returns it. Everything is validated first; `out_dir` appears complete or
    not at all (a non-empty one is refused unless `force`)."""
    from pam_jax.cliutil import atomic_dir, check_new_dir

    if Path(out_dir).absolute() == Path(model_dir).absolute():
        raise CheckpointError(f"{out_dir} is the model directory itself; choose a new folder")
    check_new_dir(out_dir, force=force, what="PAM release")
    plan = plan_export(model_dir, dtype, log)
    tensors = plan.release_tensors()
    with atomic_dir(out_dir, force=force, what="PAM release") as tmp:
        write_safetensors_shards(tmp, tensors, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2))
        copy_tokenizer_files(plan.llm_dir, tmp)
        list_chatml_specials(tmp)
        if plan.generation_config is not None:
            (tmp / "generation_config.json").write_text(
                json.dumps(plan.generation_config, indent=2)
            )
        write_sam2_pt(tmp / SAM2_PT, plan.sam2)
    n = len(shard(tensors, max_shard_size))
    log(f"{len(tensors)} tensors in {n} shard(s) ({plan.config['torch_dtype']}), "
        f"{len(plan.sam2)} of them SAM 2 under {SAM2_PREFIX}*; SAM 2 also as {SAM2_PT}: the "
        "release's loader reads SAM 2 from llava/model/multimodal_encoder/"
        "sam2.1_hiera_large.pt, so copy it there to use this SAM 2")  # fmt: skip
    return Path(out_dir)


def export_sam2(
    sam2_dir: str | os.PathLike,
    out_pt: str | os.PathLike,
    *,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """A SAM 2 model directory -> Meta's `.pt` format (`build_sam2(cfg, out_pt)` loads it).
    An existing file is refused unless `force`; the file is written whole or not at all."""
    out = Path(out_pt)
    if out.is_dir():
        raise CheckpointError(f"{out} is a directory; give the .pt file to write")
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists; choose a new file or add --force to replace it")
    errors: list[str] = []
    entries = sam2_entries(Path(sam2_dir), out_dtype(dtype), errors)
    if errors:
        raise CheckpointError(f"cannot export {sam2_dir}: " + "; ".join(errors))
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_sam2_pt(out, entries)


def run_export(args) -> int:
    """`convert pam --export`: args.pam_dir = MODEL_DIR, args.out_dir = the release to write.
    Errors propagate to `cliutil.run_command` (one line on stderr, exit code 2)."""
    from pam_jax.cliutil import CLIError

    if getattr(args, "sam2", None):
        raise CLIError("--sam2 is for importing a release; --export takes SAM 2 from MODEL_DIR")
    out = export_pam(
        args.pam_dir, args.out_dir, dtype=args.dtype, force=getattr(args, "force", False)
    )
    print(f"wrote {out}")
    return 0
