"""The instruct stage's speed switches (decoder.qwen: gradient_checkpointing, compile, attention,
lora.target_modules all-linear) change how a step runs, never what it computes."""

from __future__ import annotations

import pytest
import torch

from edge_glass.config import ConfigError, LoraConfig, QwenConfig
from edge_glass.utils.errors import UserError

EXAMPLES = [
    {"prompt": "What colour is the shape?", "answer": "red"},
    {"prompt": "Describe the image in a few words.", "answer": "a large green star at the top"},
    {"prompt": "Where is it?", "answer": "bottom left"},
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from edge_glass.local_models.build import build_local_models

    # The session's shared tiny models (built once, reused by other modules' fixtures).
    return build_local_models(tmp_path_factory.getbasetemp() / "local-models", include_real=False)["qwen2-tiny"]


def _step(qwen_dir, **switches):
    """Loss, prefix gradient and trained-parameter gradients of one training step."""
    from edge_glass.decoders.qwen import QwenDecoder

    lora = switches.pop("lora", LoraConfig(dropout=0.0))
    torch.manual_seed(0)
    dec = QwenDecoder(QwenConfig(model=str(qwen_dir), tune="lora", lora=lora, max_length=64, **switches))
    layers = dec._causal_lm().model.layers
    assert all(layer._compiled_call_impl is None for layer in layers), "nothing compiles for answering"
    dec.prepare_training()  # what the instruct stage calls
    dec.train()
    batch = dec.encode_examples(EXAMPLES, 4)
    prefix = torch.randn(len(EXAMPLES), 4, dec.width, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss, _ = dec.batch_loss(prefix, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in dec.named_parameters() if p.requires_grad}
    return dec, loss.detach(), prefix.grad.clone(), grads


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[2], b[2], rtol=rtol * 10, atol=atol)
    assert a[3].keys() == b[3].keys() and a[3]
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], rtol=rtol * 10, atol=atol)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(qwen_dir):
    plain = _step(qwen_dir)
    checkpointed = _step(qwen_dir, gradient_checkpointing=True)
    assert checkpointed[0]._causal_lm().model.gradient_checkpointing, "the layers recompute in backward"
    _assert_same(checkpointed, plain)


def test_compiled_decoder_layers_give_the_same_loss_and_gradients(qwen_dir, monkeypatch):
    # The same graphs (dynamo, then AOTAutograd's forward and backward) run by aot_eager rather
    # than inductor: inductor's C++ code generation alone takes ~30 s on the CI's 2 cores, and
    # what this checks is that the LoRA-wrapped layers trace and compute what eager ones do.
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *args, **kwargs: compile_module(self, *args, **{**kwargs, "backend": "aot_eager"}))
    plain = _step(qwen_dir)
    compiled = _step(qwen_dir, compile=True)
    layers = compiled[0]._causal_lm().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    # Fused element-wise kernels reorder float sums: equal within float32 rounding, not bitwise.
    _assert_same(compiled, plain, rtol=1e-4, atol=1e-5)


def test_all_linear_lora_adapts_the_mlp_too_and_nothing_else_changes(qwen_dir):
    attention_only = _step(qwen_dir)[0]
    everything = _step(qwen_dir, lora=LoraConfig(dropout=0.0, target_modules=["all-linear"]))[0]

    def adapted(dec):
        return {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in dec.named_parameters() if ".lora_A" in n}

    assert adapted(attention_only) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert adapted(everything) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n, p in everything.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="all-linear already names every linear layer"):
        LoraConfig(target_modules=["all-linear", "q_proj"])


def test_eager_attention_is_the_reference_sdpa_matches(qwen_dir):
    _assert_same(_step(qwen_dir, attention="sdpa"), _step(qwen_dir, attention="eager"), rtol=1e-5, atol=1e-5)


def test_flash_attention_without_its_package_or_a_gpu_is_one_line(qwen_dir):
    from edge_glass.decoders.qwen import QwenDecoder

    with pytest.raises(UserError, match=r"decoder.qwen.attention: flash_attention_2 needs .*(flash-attn|CUDA GPU).*use sdpa"):
        QwenDecoder(QwenConfig(model=str(qwen_dir), attention="flash_attention_2"))
