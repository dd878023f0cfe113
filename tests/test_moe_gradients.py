"""One step's parameter gradients of a Qwen3-MoE model (router and experts included) against transformers in
float64, with the SFT loss and the auxiliary losses (load balancing and z-loss) written here as moe.py defines
them: A = sum over MoE layers of coeff * mean over micro-batches and data-parallel ranks of each micro-batch's
loss. At EP 1 and EP 2, TP 2 (SP) and PP 2, with 1 and 2 micro-batches per rank, for every loss (sft divided by
answer tokens, the others by sequences), and the routing figures logged (moe.RoutingStatistics) against the same
float64 routers; 1 against 4 micro-batches where the definition makes them equal."""

import re

import pytest
import torch
import torch.nn.functional as F

from tests.convert_workers import make_hf_model
from tests.distributed import spawn
from tests.moe_workers import row_masks, step_gradients
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


def sequence_losses(loss, logp_sum, ref_logp_sum, m):
    """[rows] each sequence's loss before the global denominator, as the paper writes them."""
    if loss == "sft":
        return -logp_sum
    if loss == "sft_seq":
        return -logp_sum / m
    deviation = logp_sum - ref_logp_sum
    if loss == "sft_dpo":
        return -F.logsigmoid(BETA * deviation)
    return -2 * torch.sigmoid(-BETA * deviation).detach() * logp_sum / m  # minor_sft


def router_losses(logits):
    """This micro-batch's load-balancing loss, z-loss and tokens per expert of one MoE layer ([T, E] logits)."""
    t, e = logits.shape
    counts = F.one_hot(logits.topk(2, dim=-1).indices, e).sum((0, 1)).double()
    balancing = e / (2 * t * t) * (logits.softmax(-1).sum(0) * counts).sum()
    return balancing, (torch.logsumexp(logits, -1) ** 2).mean(), counts


def reference(hf_dir, tokens, ref_logp_sum, loss, micro_batch_size, dp, coeffs=COEFFS, prompts=PROMPTS,
              lengths=None):
    """Parameter gradients (by saved Hugging Face name) of L = SFT / N + A in float64, the weights, and the routing
    figures {name_layer_i: value} of moe.RoutingStatistics; the routers' statistics leave padding out."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, experts_implementation="eager")
    logits_seen = []  # (layer index, [T, E] router logits) of the micro-batch being run
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda mod, inp, out, i=i: logits_seen.append((i, out[0])))
    mask, padding = row_masks(tokens, prompts, lengths)
    mask = mask.double()
    n_total = mask.sum() if loss == "sft" else (mask.sum(1) > 0).sum()
    groups = [i.split(micro_batch_size) for i in torch.arange(tokens.size(0)).chunk(dp)]
    total, figures, counts = 0.0, {}, {}
    for rank_batches in groups:
        for rows in rank_batches:
            logits_seen.clear()
            out = model(tokens[rows, :-1]).logits.log_softmax(-1)
            logp_sum = (out.gather(-1, tokens[rows, 1:, None])[..., 0] * mask[rows]).sum(1)
            total = total + sequence_losses(loss, logp_sum, ref_logp_sum[rows], mask[rows].sum(1)).sum() / n_total
            for i, logits in logits_seen:  # [rows * s, E], row-major
                balancing, z, routed = router_losses(logits[~padding[rows].reshape(-1)])
                mean = 1 / (len(rank_batches) * dp)  # over micro-batches and data-parallel ranks
                total = total + (coeffs[0] * balancing + coeffs[1] * z) * mean
                for name, value in (("moe_load_balancing_loss", balancing), ("moe_z_loss", z)):
                    figures[f"{name}_layer_{i}"] = figures.get(f"{name}_layer_{i}", 0.0) + float(value.detach()) * mean
                counts[i] = counts.get(i, 0) + routed
    total.backward()
    figures.update({f"moe_max_load_layer_{i}": float(c.max() / c.mean()) for i, c in counts.items()})
    params = {n: p.grad for n, p in model.named_parameters()}
    weights = {n: p.detach() for n, p in model.named_parameters()}
    return params, weights, figures


def our_step(converted, tmp_path, tokens, ref_logp_sum, loss, layout, micro_batch_size, coeffs=COEFFS,
             prompts=PROMPTS, lengths=None):
    """Our step's gradients under Hugging Face names, and its routing figures (on 2 processes, 4 for TP x PP 4)."""
    import subprocess
    import sys

    out = str(tmp_path / "grads")
    spawn(max(2, layout[0] * layout[1]), step_gradients, str(converted / FAMILY / "megatron"), layout, tokens,
          prompts, ref_logp_sum, micro_batch_size, loss, coeffs, out, lengths, out_dir=tmp_path / "job", timeout=300)
    back = str(tmp_path / "hf_grads")
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import megatron_to_hf; "
                    "megatron_to_hf(sys.argv[1], sys.argv[2], log=lambda *_: None)", out, back], check=True,
                   timeout=300)
    return tensors(back), torch.load(f"{out}.routing.pt")


def relative_error(got, want) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))


PADDED = [16, 11, 13, 16]
"""Positions of each row that hold its sample (of 16); the rest is padding, which the routers leave out."""


@pytest.mark.parametrize("loss,layout,micro_batch_size,lengths", [
    ("minor_sft", (1, 1, 1), 2, None), ("minor_sft", (1, 1, 2), 1, None), ("sft", (1, 1, 2), 2, None),
    ("sft_seq", (1, 1, 1), 1, None), ("sft_dpo", (1, 1, 2), 2, None), ("minor_sft", (2, 1, 1), 2, None),
    ("sft", (1, 2, 1), 1, None), ("minor_sft", (2, 1, 1, 1), 2, None),
    ("minor_sft", (1, 1, 2), 2, PADDED), ("sft", (2, 1, 1), 1, PADDED), ("minor_sft", (2, 2, 1), 2, PADDED),
])  # (tp, pp, ep[, etp]); SP with tp 2; TP 2 x PP 2 on 4 processes
def test_step_gradients_match_transformers(converted, tmp_path, loss, layout, micro_batch_size, lengths):
    tokens = torch.randint(0, 300, (ROWS, LENGTH), generator=torch.Generator().manual_seed(3))
    ref_logp_sum = -torch.linspace(20.0, 60.0, ROWS, dtype=torch.float64)  # weights far from 1
    ours, figures = our_step(converted, tmp_path, tokens, ref_logp_sum, loss, layout, micro_batch_size,
                             lengths=lengths)
    grads, weights, want_figures = reference(str(converted / FAMILY / "hf"), tokens, ref_logp_sum, loss,
                                             micro_batch_size, dp=max(1, 2 // (layout[0] * layout[1])),
                                             lengths=lengths)
    original = tensors(str(converted / FAMILY / "hf"))
    assert ours.keys() == original.keys()
    for name, got in ours.items():
        pick = hf_name_of(name, grads)
        assert torch.equal(pick(weights).float(), original[name]), name  # the name mapping itself
        err = relative_error(got, pick(grads))
        assert err <= 1e-5, (name, err)
    router = [n for n in ours if n.endswith("mlp.gate.weight")]
    assert router and all(hf_name_of(n, grads)(grads).abs().max() > 0 for n in router)
    per_layer = {k: v for k, v in figures.items() if "_layer_" in k}
    assert per_layer.keys() == want_figures.keys()
    for name, want in want_figures.items():
        assert abs(per_layer[name] - want) <= 1e-5 * abs(want), (name, per_layer[name], want)
    layers = sorted({k.rsplit("_", 1)[1] for k in per_layer})
    for name in ("moe_load_balancing_loss", "moe_z_loss"):
        mean = sum(want_figures[f"{name}_layer_{i}"] for i in layers) / len(layers)
        assert abs(figures[name] - mean) <= 1e-5 * mean, name
    assert figures["moe_max_load"] == max(per_layer[f"moe_max_load_layer_{i}"] for i in layers)


def test_one_and_four_micro_batches(converted, tmp_path):
    """The SFT term is exact whatever the batching, and so is the z-loss here (a mean over each micro-batch's
    positions, every micro-batch the same size): 1 and 4 micro-batches per rank give the same gradients. The
    load-balancing loss is a statistic of each micro-batch's routing, so A differs between them by definition (shown
    on the float64 reference)."""
    rows, prompts, coeffs = 8, [3, 6, 9, 12, 4, 7, 10, 13], (0.0, 0.1)
    tokens = torch.randint(0, 300, (rows, LENGTH), generator=torch.Generator().manual_seed(5))
    ref_logp_sum = -torch.linspace(20.0, 60.0, rows, dtype=torch.float64)
    one, _ = our_step(converted, tmp_path / "one", tokens, ref_logp_sum, "minor_sft", (1, 1, 2), 4, coeffs, prompts)
    four, _ = our_step(converted, tmp_path / "four", tokens, ref_logp_sum, "minor_sft", (1, 1, 2), 1, coeffs, prompts)
    hf = str(converted / FAMILY / "hf")
    grads, _, _ = reference(hf, tokens, ref_logp_sum, "minor_sft", 4, dp=2, coeffs=coeffs, prompts=prompts)
    for name in one:
        want = hf_name_of(name, grads)(grads)
        assert relative_error(one[name], want) <= 1e-5 and relative_error(four[name], want) <= 1e-5, name
    with_balancing = [reference(hf, tokens, ref_logp_sum, "minor_sft", mbs, dp=2, prompts=prompts)[0]
                      for mbs in (4, 1)]
    router = [n for n in one if n.endswith("mlp.gate.weight")]
    assert max(relative_error(hf_name_of(n, with_balancing[0])(with_balancing[0]),
                              hf_name_of(n, with_balancing[1])(with_balancing[1])) for n in router) > 1e-3
