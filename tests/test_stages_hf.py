"""SFT and DPO from a local Hugging Face folder: its tokenizer, its model as the reference, refusals."""

import json
import math

import pytest
import torch
import yaml
from stage_helpers import (
    CONVERSATION,
    PAIRS,
    write_jsonl,
)

from micro_arch.config import ModelConfig
from micro_arch.data.chat_template import (
    load_chat_tokenizer,
)
from micro_arch.errors import MicroArchError
from micro_arch.model.model import Model

LLAMA_SECTION = {"d_model": 32, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 128,
                 "tie_embeddings": False, "defaults": {"Norm": "rmsnorm(eps=1e-6)"},
                 "layers": [{"spec": "Norm->Attn->+->Norm->MLP->+", "repeat": 2}]}


DIALOGUE = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}] for p in PAIRS]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny LlamaForCausalLM saved by transformers, with a byte-level BPE tokenizer (BOS added by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for c in [*DIALOGUE, CONVERSATION] for m in c] * 4
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def folder_experiment(folder, tmp_path, stage, rows, **train):
    """An experiment folder: the model section the Llama folder needs, `rows` as training and held-out data."""
    data = write_jsonl(tmp_path / f"{stage}.jsonl", rows)
    exp = tmp_path / f"{stage}-from-hf"
    exp.mkdir()
    (exp / "config.yaml").write_text(yaml.safe_dump({
        "model": {**LLAMA_SECTION, "init_from": str(folder)}, "data": {"source": data, "val_source": data},
        "train": {"stage": stage, "seq_len": 96, "batch_size": 4, "max_steps": 10, "lr": 3e-3, "warmup_steps": 1,
                  "eval_every": 10, "eval_batches": 1, "log_every": 5, "checkpoint_every": 10,
                  "sample": {"prompts": ["Who"], "max_new_tokens": 4}, **train}}))
    return exp


def test_sft_from_a_hugging_face_folder_learns_with_its_tokenizer(llama_folder, tmp_path):
    from transformers import AutoTokenizer

    from micro_arch.commands.run import run_experiment
    from micro_arch.experiment import load_experiment
    from micro_arch.hf.export import export_run
    from micro_arch.stages.evaluate_stage import evaluate_stage_run
    from micro_arch.stages.setup import stage_tokenizer

    rows = [{"messages": c} for c in [*DIALOGUE, CONVERSATION]]
    exp = folder_experiment(llama_folder, tmp_path, "sft", rows)
    run = run_experiment(exp, runs_root=tmp_path / "runs")
    rows_in_folder = AutoTokenizer.from_pretrained(llama_folder).backend_tokenizer.get_vocab_size()
    parent = json.loads((run / "parent.json").read_text())
    assert parent["type"] == "huggingface" and parent["changed"]["vocab_size"] == [rows_in_folder, rows_in_folder + 4]
    # the run keeps the folder's tokenizer (content without its BOS) and puts the template's tokens after it
    chat, theirs = load_chat_tokenizer(run), AutoTokenizer.from_pretrained(llama_folder)
    text = "Nay, answer me: stand, and unfold yourself."
    assert chat.encode(text) == theirs(text, add_special_tokens=False)["input_ids"] == theirs(text)["input_ids"][1:]
    assert chat.decode(chat.encode(text)) == text and chat.role_id["system"] == rows_in_folder
    # the loss on the assistant tokens, before (the folder's weights) and after ten steps
    result = evaluate_stage_run(run, device="cpu")
    assert result["after"]["assistant_tokens"] == result["before"]["assistant_tokens"] > 50
    assert result["after"]["assistant_loss"] < result["before"]["assistant_loss"] - 0.5
    # exported again, the folder already holds the template's tokens: a further stage reuses their ids
    export_run(run, tmp_path / "exported")
    card = (tmp_path / "exported" / "README.md").read_text()
    assert f"| started from | {llama_folder.resolve()} (LlamaForCausalLM) |" in card and "| pid |" not in card
    cfg = load_experiment(exp, [f"model.init_from={tmp_path / 'exported'}"])
    again = stage_tokenizer(cfg)
    assert again.vocab_size == chat.vocab_size and again.ids == chat.ids and again.encode(text) == chat.encode(text)


def test_dpo_from_a_hugging_face_folder_has_the_folders_model_as_reference(llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from micro_arch.experiment import load_experiment
    from micro_arch.hf.init import load_initial_weights
    from micro_arch.stages import stage_of

    cfg = load_experiment(folder_experiment(llama_folder, tmp_path, "dpo", PAIRS, dpo_beta=0.5))
    data = stage_of(cfg).prepare_data(cfg)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    stage = stage_of(cfg).pieces(cfg, data, torch.device("cpu"))
    folder_model = AutoModelForCausalLM.from_pretrained(llama_folder, local_files_only=True).eval()
    rows = folder_model.config.vocab_size
    idx = torch.randint(0, rows, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = stage.reference(idx).logits
        torch.testing.assert_close(ours[..., :rows], folder_model(input_ids=idx).logits, atol=1e-5, rtol=0)
    policy = Model(cfg.model)
    load_initial_weights(policy, cfg.model)
    loss, _ = stage.loss_fn(policy, stage.source.batch(0))
    assert float(loss.detach()) == pytest.approx(math.log(2), rel=1e-5)  # the policy starts as the reference


def test_a_folder_the_stages_cannot_use_is_one_line(llama_folder, tmp_path):
    import shutil

    from helpers import run_cli
    from transformers import GPTNeoXConfig

    from micro_arch.experiment import load_experiment
    from micro_arch.stages import stage_of

    bare = tmp_path / "no-tokenizer"
    shutil.copytree(llama_folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    exp = folder_experiment(bare, tmp_path, "sft", [{"messages": c} for c in DIALOGUE])
    out = run_cli("run", exp, "--runs-dir", tmp_path / "runs")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no tokenizer files (tokenizer.json, " in out.stderr
    assert "train.stage=sft needs the model's tokenizer: save the model's tokenizer beside its weights" in out.stderr
    assert not (tmp_path / "runs").exists()

    other = tmp_path / "neox"
    shutil.copytree(llama_folder, other, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    GPTNeoXConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64).save_pretrained(other)
    cfg = load_experiment(exp, [f"model.init_from={other}"])
    with pytest.raises(MicroArchError, match="cannot import: model_type 'gpt_neox' has no micro-arch layout; "
                                             "supported: gpt2, llama, mamba, mistral, mixtral, qwen2_moe, qwen3"):
        stage_of(cfg).prepare_data(cfg)


def test_a_model_section_that_does_not_match_the_folder_shows_the_one_that_does(llama_folder, tmp_path):
    from micro_arch.config import from_dict
    from micro_arch.experiment import load_experiment
    from micro_arch.hf.init import load_initial_weights

    cfg = load_experiment(folder_experiment(llama_folder, tmp_path, "sft", []), ["model.d_ff=48"])
    cfg.model.vocab_size = 300
    with pytest.raises(MicroArchError, match="hidden is 64 in the source, 48 here") as err:
        load_initial_weights(Model(cfg.model), cfg.model)
    section = yaml.safe_load(str(err.value).split("the folder's model section: ", 1)[1])
    assert section["d_ff"] == 64 and section["n_kv_heads"] == 1
    pasted = from_dict(ModelConfig, {**section, "vocab_size": 300, "init_from": str(llama_folder)})
    assert load_initial_weights(Model(pasted), pasted)["type"] == "huggingface"
