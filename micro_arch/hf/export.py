"""`micro-arch export RUN_DIR --out DIR`: a folder that transformers loads with no custom code.

Refusals (micro_arch.hf.layouts) come before anything is written. The folder is written under a temporary
name next to DIR, loaded back with AutoModelForCausalLM and AutoTokenizer (local files only), compared
(logits on a fixed batch, token ids on a check text), and renamed to DIR only when everything agrees.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import torch

from micro_arch.errors import MicroArchError
from micro_arch.offline import offline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOGIT_TOLERANCE = 1e-4  # times max(1, largest |logit|): float32 sums in another order stay far below it
CHECK_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. 1603 \t!"


def build_hf_model(layout, state: dict | None = None):
    """The transformers model of `layout`, with `state` (transformers names) loaded if given."""
    import transformers

    config = getattr(transformers, layout.config_class)(**layout.config)
    model = getattr(transformers, layout.hf_class)(config)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise MicroArchError(f"internal: the {layout.hf_class} weights do not line up (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        if config.tie_word_embeddings:
            model.tie_weights()
    return model.eval()


def check_batch(vocab_size: int, max_seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, min(max_seq_len, 48)), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def compare_logits(model, hf_model, idx: torch.Tensor) -> tuple[float, float]:
    """(max |ours - theirs|, the tolerance it must stay under) on idx, both in float32."""
    ours = model(idx).logits.float()
    theirs = hf_model(input_ids=idx).logits.float()
    return float((ours - theirs).abs().max()), LOGIT_TOLERANCE * max(1.0, float(ours.abs().max()))


def _check_text(run_dir: Path, tokenizer) -> str:
    text = CHECK_TEXT
    samples = run_dir / "samples.json"
    if samples.is_file():
        text += "".join(s.get("prompt", "") + s.get("text", "") for s in json.loads(samples.read_text()))
    if getattr(tokenizer, "name", None) == "char":  # only characters the vocabulary has
        return "".join(c for c in text if c in set(tokenizer.chars)) + tokenizer.chars
    try:
        tokenizer.encode(text)
        return text
    except (KeyError, ValueError):  # e.g. a folder's character vocabulary: keep the characters it encodes
        return "".join(c for c in text if _encodes(tokenizer, c))


def _encodes(tokenizer, text: str) -> bool:
    try:
        tokenizer.encode(text)
        return True
    except (KeyError, ValueError):
        return False


def chat_tokens(run_dir: Path, tokenizer) -> list[str]:
    """The special tokens of an SFT/DPO run (chat_template.json of micro_arch.stages), [] for other runs."""
    path = run_dir / "chat_template.json"
    if not path.is_file():
        return []
    meta = json.loads(path.read_text())
    if meta.get("base_vocab_size") != tokenizer.vocab_size:
        raise MicroArchError(f"{path}: special tokens after a vocabulary of {meta.get('base_vocab_size')}, but the "
                             f"run's tokenizer has {tokenizer.vocab_size}")
    return list(meta.get("special_tokens", []))


def check_shard_size(text: str) -> None:
    """--max-shard-size as transformers' save_pretrained reads it: a positive number and KB, MB, GB or TB."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(KB|MB|GB|TB)\s*", str(text), re.IGNORECASE)
    if not found or float(found.group(1)) <= 0:
        raise MicroArchError(f"--max-shard-size {text!r}: a size such as 500MB or 2GB (a positive number, then "
                             "KB, MB, GB or TB)")


def with_default_modes(folder: Path) -> None:
    """Every file of `folder` with the permissions of its config.json, a file written the ordinary way (0644
    under the usual umask): the safetensors writer creates its files 0600, unreadable to the other users that
    the rest of the folder is readable to."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def export_run(run_dir, out, checkpoint=None, dtype: str = "float32", max_shard_size: str = "2GB") -> dict:
    """Export `run_dir` (its latest checkpoint, or `checkpoint`) to the folder `out`; returns what was checked."""
    offline()
    from transformers import AutoModelForCausalLM, GenerationConfig

    from micro_arch.checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint
    from micro_arch.hf.card import provenance, write_card
    from micro_arch.hf.layouts import layout_of
    from micro_arch.hf.tokenizer import check_tokenizer, hf_tokenizer
    from micro_arch.hf.weights import to_hf
    from micro_arch.rundir import load_run

    if dtype not in DTYPES:
        raise MicroArchError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    check_shard_size(max_shard_size)
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MicroArchError(f"--out {out}: exists and is not an empty folder; choose a new folder or remove it")
    if not out.parent.is_dir():  # the folder itself is made, never its parents (a typo is not a new tree)
        raise MicroArchError(f"--out {out}: the folder {out.parent} does not exist; create it first or pick a path "
                             "in an existing folder")
    ckpt_path = resolve_checkpoint(run_dir, checkpoint) if checkpoint else latest_checkpoint(run_dir)
    cfg, model, tokenizer = load_run(run_dir, ckpt_path)
    model.float()
    layout = layout_of(model)  # a refusal leaves nothing behind
    payload = load_checkpoint(ckpt_path)
    info = provenance(run_dir, cfg, payload, ckpt_path)
    hf_model = build_hf_model(layout, to_hf(layout, model.state_dict())).to(DTYPES[dtype])
    hf_model.config.dtype = dtype
    special = chat_tokens(run_dir, tokenizer)
    end = {"eos_token_id": tokenizer.vocab_size + len(special) - 1} if special else {}
    s = cfg.train.sample
    # no max_new_tokens: it would override a caller's max_length (lm-eval's hf model passes max_length)
    hf_model.generation_config = GenerationConfig(do_sample=True, temperature=s.temperature, top_k=s.top_k,
                                                  top_p=s.top_p, **end)
    reference = model
    if dtype != "float32":  # compare against the weights as exported
        reference = copy.deepcopy(model)
        for p in reference.parameters():
            p.data = p.data.to(DTYPES[dtype]).float()
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        hf_model.save_pretrained(partial, max_shard_size=max_shard_size)
        hf_tokenizer(tokenizer, special, model_max_length=cfg.model.max_seq_len).save_pretrained(partial)
        loaded = AutoModelForCausalLM.from_pretrained(partial, local_files_only=True, dtype=torch.float32).eval()
        idx = check_batch(cfg.model.vocab_size, cfg.model.max_seq_len)
        diff, tolerance = compare_logits(reference, loaded, idx)
        if not diff <= tolerance:
            raise MicroArchError(f"the exported {layout.hf_class} disagrees with the run: logits differ by {diff:.3g} "
                                 f"(tolerance {tolerance:.3g}); nothing was exported")
        check_tokenizer(partial, tokenizer, _check_text(run_dir, tokenizer))
        check = {"hf_class": layout.hf_class, "max_abs_diff": diff, "tolerance": tolerance,
                 "tokens": idx.numel(), "dtype": dtype}
        write_card(partial, run_dir, info, layout, check)
        with_default_modes(partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {**check, "out": str(out), "files": sorted(p.name for p in out.iterdir())}
