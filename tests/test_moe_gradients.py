"""One step's parameter gradients of a Qwen3-MoE model (router and experts included) against transformers in
float64, with the SFT loss and the auxiliary losses (load balancing and z-loss) written here as moe.py defines
them: A = sum over MoE layers of coeff * mean over micro-batches and data-parallel ranks of each micro-batch's
loss. At EP 1 and EP 2, with 1 and 2 micro-batches per rank, for minor_sft (divided by sequences) and sft (by
answer tokens)."""

import re

import pytest
import torch
import torch.nn.functional as F

from tests.convert_workers import make_hf_model
from tests.distributed import spawn
from tests.moe_workers import answer_mask, step_gradients
from tests.test_convert import CONVERT, tensors

FAMILY = "qwen3_moe"
COEFFS = (0.5, 0.1)  # large, so that a wrong scaling of the auxiliary term shows far above the tolerance
BETA = 0.04
ROWS, LENGTH = 4, 17
PROMPTS = [3, 6, 9, 12]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("moe_grad")
    make_hf_model(FAMILY, str(root / FAMILY / "hf"))
    subprocess.run([sys.executable, "-c", CONVERT, str(root), FAMILY], check=True, timeout=600)
    return root


def hf_name_of(saved: str, model_params: dict):
    """The (parameter, slice) of a transformers 5 model that a saved (per-expert) tensor name is."""
    m = re.fullmatch(r"(.*)\.experts\.(\d+)\.(gate|up|down)_proj\.weight", saved)
    if not m:
        return lambda p: p[saved]
    prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
    if kind == "down":
        return lambda p: p[f"{prefix}.experts.down_proj"][e]
    return lambda p: p[f"{prefix}.experts.gate_up_proj"][e].chunk(2)[0 if kind == "gate" else 1]


def reference(hf_dir, tokens, ref_logp_sum, loss, micro_batch_size, dp):
    """Parameter gradients (by saved Hugging Face name) of L = SFT / N + A in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, experts_implementation="eager")
    logits_seen = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda mod, inp, out: logits_seen.append(out[0]))
    mask = answer_mask(tokens, PROMPTS).double()
    n_total = (mask.sum(1) > 0).sum() if loss == "minor_sft" else mask.sum()
    groups = [i.split(micro_batch_size) for i in torch.arange(tokens.size(0)).chunk(dp)]
    total = 0.0
    for rank_batches in groups:
        for rows in rank_batches:
            logits_seen.clear()
            out = model(tokens[rows, :-1]).logits.log_softmax(-1)
            logp_sum = (out.gather(-1, tokens[rows, 1:, None])[..., 0] * mask[rows]).sum(1)
            m = mask[rows].sum(1)
            if loss == "minor_sft":
                weight = 2 * torch.sigmoid(-BETA * (logp_sum - ref_logp_sum[rows])).detach()
                total = total - (weight * logp_sum / m).sum() / n_total
            else:
                total = total - logp_sum.sum() / n_total
            for logits in logits_seen:  # [T, E] this micro-batch's router logits, one MoE layer
                t, e = logits.shape
                chosen = logits.topk(2, dim=-1).indices
                counts = F.one_hot(chosen, e).sum((0, 1)).double()
                aux = e / (2 * t * t) * (logits.softmax(-1).sum(0) * counts).sum()
                z = (torch.logsumexp(logits, -1) ** 2).mean()
                total = total + (COEFFS[0] * aux + COEFFS[1] * z) / (len(rank_batches) * dp)
    total.backward()
    params = {n: p.grad for n, p in model.named_parameters()}
    weights = {n: p.detach() for n, p in model.named_parameters()}
    return params, weights


@pytest.mark.parametrize("loss,ep,micro_batch_size", [("minor_sft", 1, 2), ("minor_sft", 2, 1), ("sft", 2, 2),
                                                      ("sft", 1, 1)])
def test_step_gradients_match_transformers(converted, tmp_path, loss, ep, micro_batch_size):
    tokens = torch.randint(0, 300, (ROWS, LENGTH), generator=torch.Generator().manual_seed(3))
    ref_logp_sum = -torch.linspace(20.0, 60.0, ROWS, dtype=torch.float64)  # weights far from 1
    out = str(tmp_path / "grads")
    spawn(2, step_gradients, str(converted / FAMILY / "megatron"), (1, 1, ep), tokens, PROMPTS, ref_logp_sum,
          micro_batch_size, loss, COEFFS, out, out_dir=tmp_path / "job", timeout=300)
    import subprocess
    import sys

    back = str(tmp_path / "hf_grads")
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import megatron_to_hf; "
                    "megatron_to_hf(sys.argv[1], sys.argv[2], log=lambda *_: None)", out, back], check=True,
                   timeout=300)
    ours = tensors(back)
    grads, weights = reference(str(converted / FAMILY / "hf"), tokens, ref_logp_sum, loss, micro_batch_size, dp=2)
    original = tensors(str(converted / FAMILY / "hf"))
    assert ours.keys() == original.keys()
    for name, got in ours.items():
        pick = hf_name_of(name, grads)
        assert torch.equal(pick(weights).float(), original[name]), name  # the name mapping itself
        want = pick(grads)
        err = float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))
        assert err <= 1e-5, (name, err)
    router = [n for n in ours if n.endswith("mlp.gate.weight")]
    assert router and all(hf_name_of(n, grads)(grads).abs().max() > 0 for n in router)
