"""FLOP accounting (edge_glass.training.flops) and the GPU check script's dry run.

The analytic formulas are checked against torch's FlopCounterMode on real transformers models
(tiny Qwen2, full, frozen and LoRA), so a wrong factor in either shows up; the dry run proves the
GPU script works end to end before it is spent on a short GPU lease.

Run with: python -m pytest tests/test_gpu_check.py -q
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from torch import nn

from conftest import REPO
from edge_glass.training.flops import (
    causal_lm_flops_per_token,
    count_flops,
    linear_params,
    mfu,
    peak_flops,
    peak_flops_for_name,
    transformer_flops_per_token,
)

BATCH, SEQ = 2, 256  # a long context next to the width, so attention is ~40 % of the FLOPs


def tiny_qwen2(attn_implementation: str = "sdpa"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=SEQ, tie_word_embeddings=True, attn_implementation=attn_implementation))


def ids() -> torch.Tensor:
    return torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def test_linear_forward_backward_is_6_flops_per_weight_per_row():
    layer = nn.Linear(96, 40)
    x = torch.randn(8, 96, requires_grad=True)
    assert count_flops(lambda: layer(x).sum().backward()) == 6 * 96 * 40 * 8
    # Nothing below needs a gradient: no input-gradient product, 4 instead of 6.
    x = torch.randn(8, 96)
    assert count_flops(lambda: layer(x).sum().backward()) == 4 * 96 * 40 * 8


def test_attention_is_counted_with_query_heads_under_grouped_query_attention():
    b, q_heads, kv_heads, t, d = 2, 4, 2, 16, 8
    q = torch.randn(b, q_heads, t, d, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, t, d, requires_grad=True) for _ in range(2))
    forward = 4 * b * q_heads * t * t * d  # scores and weighted sum, every query head
    attend = lambda: nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    assert count_flops(attend) == forward
    # torch counts the fused backward with its recomputation of the scores: 2.5x the forward.
    assert count_flops(lambda: attend().sum().backward()) == forward * 3.5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_training_estimate_matches_flop_counter_on_tiny_qwen2(attn):
    model = tiny_qwen2(attn)
    x = ids()
    counted = count_flops(lambda: model(input_ids=x, labels=x).loss.backward())
    trainable, frozen = linear_params(model)
    assert frozen == 0 and trainable > model.model.embed_tokens.weight.numel()  # the tied head is counted
    # sdpa on CPU is counted through flops.py's mapping; without it attention would be ~40 % short.
    assert counted == pytest.approx(causal_lm_flops_per_token(model, SEQ) * BATCH * SEQ, rel=0.15)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_frozen_and_lora_estimates_match_flop_counter():
    """Eager attention, whose products torch counts exactly as the formula does, so a tight
    tolerance catches a wrong factor on the frozen weights (6 instead of 4 would be 17 % off)."""
    import peft

    x = ids()
    frozen = tiny_qwen2("eager").requires_grad_(False)
    # A trained prefix in front (the connector's): gradients flow through the frozen weights.
    embeds = frozen.get_input_embeddings()(x).detach().requires_grad_()
    counted = count_flops(lambda: frozen(inputs_embeds=embeds, labels=x).loss.backward())
    assert counted == pytest.approx(causal_lm_flops_per_token(frozen, SEQ) * BATCH * SEQ, rel=0.02)

    lora = peft.get_peft_model(tiny_qwen2("eager"), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable, base = linear_params(lora)
    assert trainable == 2 * (2 * 4 * (64 + 64) + 2 * 4 * (64 + 32))  # r 4: A and B of q, o (64->64) and k, v (64->32), 2 layers
    assert base == linear_params(frozen)[1]
    embeds = lora.get_input_embeddings()(x).detach().requires_grad_()
    counted = count_flops(lambda: lora(inputs_embeds=embeds, labels=x).loss.backward())
    assert counted == pytest.approx(causal_lm_flops_per_token(lora, SEQ) * BATCH * SEQ, rel=0.02)


def test_frozen_base_costs_about_two_thirds_of_full_training():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    no_attention = transformer_flops_per_token(0, 1000, 2, 64, 0) / transformer_flops_per_token(1000, 0, 2, 64, 0)
    assert no_attention == pytest.approx(2 / 3)
    # Qwen2.5-0.5B's shapes, on the meta device (no memory): attention lifts the ratio a little.
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                             tie_word_embeddings=True))
    n = sum(linear_params(model))
    assert 4.9e8 < n < 5.0e8  # Qwen2.5-0.5B's 494M: the tied head's products stand in for the lookup's none
    ratio = transformer_flops_per_token(0, n, 24, 896, 256) / transformer_flops_per_token(n, 0, 24, 896, 256)
    assert 0.66 < ratio < 0.70


def test_peak_flops_table_and_mfu():
    assert peak_flops("cpu", torch.bfloat16) is None
    assert mfu(1e15, 2.0, None) is None
    assert mfu(1e15, 2.0, 1e15) == pytest.approx(0.5)
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(989.4e12)
    assert peak_flops_for_name("NVIDIA H100 PCIe", torch.bfloat16) == pytest.approx(756.5e12)
    assert peak_flops_for_name("NVIDIA H200", torch.float16) == pytest.approx(989.4e12)
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", torch.bfloat16) == pytest.approx(312e12)
    assert peak_flops_for_name("NVIDIA A10", torch.bfloat16) == pytest.approx(125e12)  # not taken for an A100
    assert peak_flops_for_name("NVIDIA L40S", torch.bfloat16) != peak_flops_for_name("NVIDIA L4", torch.bfloat16)
    # fp32 matmuls: TF32 tensor cores only when torch is allowed to use them.
    assert peak_flops_for_name("NVIDIA A100-PCIE-40GB", torch.float32, tf32=True) == pytest.approx(156e12)
    assert peak_flops_for_name("NVIDIA A100-PCIE-40GB", torch.float32) == pytest.approx(19.5e12)
    assert peak_flops_for_name("Tesla T4", torch.bfloat16) is None


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_section(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["dry_run"] and results["environment"]["torch"] == torch.__version__
    assert set(results["sections"]) == {"vision_extract", "extract", "loader", "align", "instruct"}
    for name, section in results["sections"].items():
        assert "error" not in section, f"{name}: {section.get('error')}"
        # None is what a CPU reports for MFU and GPU memory; every other figure is a positive rate,
        # time or count, except the data-wait fraction.
        measured = {k: v for k, v in section["metrics"].items() if v is not None and k != "data_wait"}
        assert measured and all(v > 0 for v in measured.values()), f"{name}: {section['metrics']}"
    assert 0 <= results["sections"]["align"]["metrics"]["data_wait"] < 1
    instruct = results["sections"]["instruct"]["metrics"]
    for size in ("0.5b", "1.5b"):
        for variant in ("plain", "packed", "compiled", "filled"):
            assert 0 < instruct[f"{size}_{variant}_useful_fraction"] <= 1 and instruct[f"{size}_{variant}_tokens_per_s"] > 0
        assert instruct[f"{size}_filled_examples"] > instruct[f"{size}_plain_examples"]
    table = (out / "gpu_check.md").read_text()
    assert "| section | measurement | value |" in table and "(iii) instruct stage" in table
    assert table.strip() in proc.stdout  # the table is printed too
