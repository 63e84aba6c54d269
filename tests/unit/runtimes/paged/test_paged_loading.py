"""Loading checkpoints into the paged runner: configs, shards, rope scaling, KV cache sizing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from paged_helpers import GREEDY, GreedySampler, load_runner, random_prompts
from runtimes_helpers import make_spec
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lmaas.core.errors import ModelLoadError, ModelNotReadyError
from lmaas.runtimes.llm.batch import SeqSlot, StepBatch
from lmaas.runtimes.llm.paged import PagedModelRunner
from lmaas.runtimes.llm.paged.config import read_decoder_config
from lmaas.runtimes.llm.paged.kv_cache import default_budget_bytes
from lmaas.runtimes.llm.paged.rope import inverse_frequencies

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _edit_config(model_dir: Path, dest: Path, **changes: Any) -> Path:
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _prompt_logits(runner: PagedModelRunner, prompt: list[int]) -> torch.Tensor:
    table = list(range(-(-len(prompt) // 8)))
    return runner.compute_logits(StepBatch([SeqSlot(0, prompt, 0, table, True, GREEDY)]))[0]


def _hf_logits(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        logits: torch.Tensor = model(torch.tensor([prompt])).logits[0, -1]
    return logits


def test_unknown_architecture_is_named(tiny_lm_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = _edit_config(
        tiny_lm_dirs["llama"],
        tmp_path / "m",
        architectures=["BloomForCausalLM"],
        model_type="bloom",
    )
    with pytest.raises(ModelLoadError, match="BloomForCausalLM"):
        PagedModelRunner(make_spec(model_dir), sampler=GreedySampler()).load()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
        ({"hidden_act": "relu2"}, "relu2"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_features_are_refused(
    tiny_lm_dirs: dict[str, Path], tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    model_dir = _edit_config(tiny_lm_dirs["llama"], tmp_path / "m", **changes)
    with pytest.raises(ModelLoadError, match=message):
        read_decoder_config(model_dir)


def test_transformers_4_config_keys_are_read(tiny_lm_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = _edit_config(
        tiny_lm_dirs["llama"],
        tmp_path / "m",
        rope_parameters=None,
        rope_theta=5000.0,
        rope_scaling={"type": "linear", "factor": 2.0},
    )
    rope = read_decoder_config(model_dir).rope
    assert rope is not None
    assert (rope.theta, rope.rope_type, rope.factor) == (5000.0, "linear", 2.0)


@pytest.mark.parametrize(
    "rope", [LLAMA3_ROPE, {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}]
)
def test_rope_scaling_matches_transformers(tmp_path: Path, rope: dict[str, Any]) -> None:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rope_parameters=dict(rope),
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    parsed = read_decoder_config(tmp_path)
    assert parsed.rope is not None and parsed.num_kv_heads == 1
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
    torch.testing.assert_close(inverse_frequencies(parsed.rope, 16), hf_inv_freq, rtol=0, atol=0)
    runner, _ = load_runner(tmp_path)
    prompt = random_prompts([100], 128)[0]
    torch.testing.assert_close(_prompt_logits(runner, prompt), _hf_logits(tmp_path, prompt))


def test_sharded_checkpoint_loads(tiny_lm_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dirs["qwen3"])
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    runner, _ = load_runner(tmp_path)
    prompt = random_prompts([11], runner.config.vocab_size)[0]
    torch.testing.assert_close(_prompt_logits(runner, prompt), _hf_logits(tmp_path, prompt))


def test_missing_tensor_is_a_load_error(tiny_lm_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = _edit_config(tiny_lm_dirs["llama"], tmp_path / "m", num_hidden_layers=3)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\."):
        PagedModelRunner(make_spec(model_dir), sampler=GreedySampler()).load()


def test_missing_directory_and_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        PagedModelRunner(make_spec(tmp_path / "nope"), sampler=GreedySampler()).load()
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="malformed"):
        PagedModelRunner(make_spec(tmp_path), sampler=GreedySampler()).load()


def test_kv_cache_budget_must_hold_one_full_context(tiny_lm_dirs: dict[str, Path]) -> None:
    runner = PagedModelRunner(make_spec(tiny_lm_dirs["llama"]), sampler=GreedySampler())
    with pytest.raises(ModelNotReadyError):
        runner.allocate_kv_cache(1 << 20, 16)
    info = runner.load()
    assert (info.context_length, info.dtype, info.device) == (512, "float32", "cpu")
    # 2 layers x K,V x 2 KV heads x 16 positions x 16 dims x 4 bytes
    layout = runner.allocate_kv_cache(40 * 8192, 16)
    # The decode view comes out of the budget, leaving the 32 blocks one full context needs.
    assert (layout.block_size, layout.num_blocks, layout.bytes_per_block) == (16, 32, 8192)
    assert layout.extra_bytes == 8 * 8192 and layout.total_bytes == 40 * 8192
    without_view = PagedModelRunner(
        make_spec(tiny_lm_dirs["llama"]), sampler=GreedySampler(), decode_view_bytes=0
    )
    without_view.load()
    assert without_view.allocate_kv_cache(40 * 8192, 16).num_blocks == 40
    with pytest.raises(ModelLoadError, match="needs 32 blocks"):
        runner.allocate_kv_cache(31 * 8192, 16)
    with pytest.raises(ModelNotReadyError):
        PagedModelRunner(make_spec(tiny_lm_dirs["llama"])).execute(StepBatch([]))


def test_context_length_is_capped_by_the_model(tiny_lm_dirs: dict[str, Path]) -> None:
    spec = make_spec(tiny_lm_dirs["gpt2"], context_length=4096)
    assert PagedModelRunner(spec, sampler=GreedySampler()).load().context_length == 512
    spec = make_spec(tiny_lm_dirs["gpt2"], context_length=100)
    assert PagedModelRunner(spec, sampler=GreedySampler()).load().context_length == 100


def test_default_budget_is_a_capped_share_of_available_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:    4000000 kB\n")
    assert default_budget_bytes(torch.device("cpu"), meminfo) == 1_024_000_000
    meminfo.write_text("MemAvailable: 400000000 kB\n")
    assert default_budget_bytes(torch.device("cpu"), meminfo) == 8 << 30
    meminfo.write_text("MemTotal: 100 kB\n")
    with pytest.raises(ModelLoadError, match="MemAvailable"):
        default_budget_bytes(torch.device("cpu"), meminfo)


def test_kv_cache_fraction_of_available_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100000000 kB\nMemAvailable: 64000000 kB\n")
    cpu = torch.device("cpu")
    # An explicit fraction is honoured as given, above the 8 GiB default cap.
    assert default_budget_bytes(cpu, meminfo, fraction=0.5) == 32_768_000_000
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ModelLoadError, match="kv_cache_fraction"):
            default_budget_bytes(cpu, meminfo, fraction=bad)
