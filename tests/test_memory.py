"""Tests of the chunked LM head in `response_logprobs` (vineppo.logits_in_chunks): the same log-probabilities
and the same gradients as the full logits, and no full-vocabulary logits kept for the backward pass.

The reference here is the direct computation, written independently: the model's own forward over ALL
positions, log_softmax of logits / T, the response tokens picked out. The chunked path is forced on a
tiny model with a small vocabulary by lowering vineppo.LOGITS_CHUNK_BYTES to a few positions' worth.

    cd <repo> && python -m pytest tests/test_memory.py -q
"""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vineppo  # noqa: E402

VOCAB, TEMPERATURE = 300, 0.6
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]  # left padding differs per row
RESPONSES = [[20, 21, 22, 23, 24, 25, 26], [30, 31, 32], [40, 41, 42, 43, 44], [50]]
N = max(map(len, RESPONSES))  # 7 response columns


def tiny_model(checkpointing: bool):
    """A 2-layer Qwen2 with tied embeddings (as Qwen2.5), random weights; train() so checkpointing runs."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if checkpointing:
        vineppo.enable_gradient_checkpointing(model)
    return model.train(checkpointing)


def direct_logprobs(model, mb: dict) -> torch.Tensor:
    """log pi(response token | prefix) from the full logits of every position: [B, T]."""
    with vineppo.autocast(mb["input_ids"].device):
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                       position_ids=mb["position_ids"]).logits  # [B, L, vocab]
    logp_all = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)[:, -N - 1:-1]  # [B, T, vocab]
    return logp_all.gather(-1, mb["input_ids"][:, -N:, None]).squeeze(-1) * mb["response_mask"]


def logprobs_and_grads(model, compute) -> tuple[torch.Tensor, dict]:
    """Log-probs and the gradient of every parameter of a loss that weighs each token differently."""
    model.zero_grad(set_to_none=True)
    mb = vineppo.collate(PROMPTS, RESPONSES, pad_id=0)
    logp = compute(model, mb)
    weights = torch.linspace(-1.0, 2.0, logp.numel()).view_as(logp)  # distinct per token: a swap would show
    (logp * weights).sum().backward()
    return logp.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture
def chunk_positions(monkeypatch, request):
    """Force chunks of `request.param` positions for the 4 rows of the test batch."""
    monkeypatch.setattr(vineppo, "LOGITS_CHUNK_BYTES", request.param * len(PROMPTS) * VOCAB * 4)
    return request.param


@pytest.mark.parametrize("chunk_positions", [1, 3], indirect=True)  # 3: chunks of 3, 3, 1 columns
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "grad-ckpt"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_chunked_logprobs_and_gradients_match_the_full_logits(chunk_positions, checkpointing, bf16, monkeypatch):
    monkeypatch.setattr(vineppo, "BF16_ON_CPU", bf16)
    model = tiny_model(checkpointing)
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: head_calls.append(out.shape[1]))
    chunked, chunked_grads = logprobs_and_grads(model, lambda m, mb: vineppo.response_logprobs(m, mb, TEMPERATURE))
    forward_calls = math.ceil(N / chunk_positions)
    assert head_calls[:forward_calls] == [chunk_positions] * (N // chunk_positions) + [N % chunk_positions] * (
        N % chunk_positions > 0), "the LM head did not run on chunks of positions"
    assert len(head_calls) == 2 * forward_calls, "each chunk's logits are recomputed once in the backward pass"
    direct, direct_grads = logprobs_and_grads(model, direct_logprobs)
    mask = vineppo.collate(PROMPTS, RESPONSES, pad_id=0)["response_mask"]
    assert (chunked[mask == 0] == 0).all() and (chunked[mask == 1] < 0).all()
    tolerance = 2e-2 if bf16 else 1e-5  # bf16: the same rounded matmuls, summed in another order
    assert torch.allclose(chunked, direct, atol=tolerance, rtol=0), (chunked - direct).abs().max()
    for name, grad in direct_grads.items():
        assert chunked_grads[name] is not None, f"{name} got no gradient through the chunked path"
        error = (chunked_grads[name] - grad).norm() / grad.norm()
        assert error < (1e-2 if bf16 else 1e-5), f"{name}: relative gradient error {error:.2e}"


def saved_logits(model) -> int:
    """Elements of the per-position logits ([..., vocab]) that autograd saves for the backward pass of
    response_logprobs (the LM head's weight is [vocab, hidden]: not counted)."""
    sizes = []
    mb = vineppo.collate(PROMPTS, RESPONSES, pad_id=0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * (t.shape[-1] == VOCAB)) or t,
                                                  lambda t: t):
        vineppo.response_logprobs(model, mb, TEMPERATURE).sum().backward()
    return sum(sizes)


def test_no_full_vocabulary_logits_are_kept_for_the_backward_pass(monkeypatch):
    model = tiny_model(checkpointing=False)
    full_logits = len(PROMPTS) * N * VOCAB
    assert saved_logits(model) >= 2 * full_logits  # the direct path (the default for this small vocabulary)
    monkeypatch.setattr(vineppo, "LOGITS_CHUNK_BYTES", 2 * len(PROMPTS) * VOCAB * 4)  # chunks of 2 positions
    assert saved_logits(model) == 0  # inside the checkpoints: recomputed in the backward pass, never saved


def test_small_vocabularies_and_other_architectures_use_the_models_own_forward(monkeypatch):
    """The demo's vocabulary stays on the direct path (its numbers unchanged), and so does an architecture
    whose forward does more than lm_head(hidden) (e.g. Gemma 2's logit soft-capping)."""
    model = tiny_model(checkpointing=False)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(out.shape[1]))
    mb = vineppo.collate(PROMPTS, RESPONSES, pad_id=0)
    vineppo.response_logprobs(model, mb, TEMPERATURE)
    assert calls == [N + 1]  # one call through model(..., logits_to_keep=N + 1)
    monkeypatch.setattr(vineppo, "LOGITS_CHUNK_BYTES", len(PROMPTS) * VOCAB * 4)  # chunks of 1 position
    monkeypatch.setattr(model.config, "model_type", "gemma2")
    vineppo.response_logprobs(model, mb, TEMPERATURE)
    assert calls == [N + 1, N + 1]
