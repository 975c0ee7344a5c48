"""One training step written out plainly from the paper (Pathak et al., CVPR 2016, 3.2-3.3,
Eq. 1-3) and the official code (train.lua, train_random.lua), then compared with
ce_train.train_step (minGPT's habit). The transcription calls none of the project's step, hole,
weight or loss functions and has its own Adam; it shares only the networks (copied from the same
initial state) and, for random masks, the mask itself (ce_masks.random_masks: what is pinned here
is what the step does with it). Flags are chosen so that each wiring mistake changes a number:
lam_rec != lam_adv, lr_g != lr_d, beta2 != 0.999, overlap and its weight not the defaults.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import ce_masks
import ce_train
from ce_utils import cli

B, S = 4, 128
MEAN_FILL = (2 * 117 / 255 - 1, 2 * 104 / 255 - 1, 2 * 123 / 255 - 1)   # official train.lua:283-285
TINY = dict(width=8, bottleneck=16, device="cpu", batch_size=B, seed=0)
WIRING = dict(lam_rec=0.8, lam_adv=0.2, lr_g=3e-3, lr_d=1e-2, beta1=0.6, beta2=0.95, overlap=5,
              overlap_weight=7.0)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny tensors, one thread


# ------------------------------------------------------------------------------------------------
# The transcription

def bce(logits, label):
    """Binary cross-entropy of sigmoid(logits) against a hard label, mean over the batch."""
    return -(label * F.logsigmoid(logits) + (1 - label) * F.logsigmoid(-logits)).mean()


class PlainAdam:
    """Kingma & Ba, Algorithm 1 (eps 1e-8, no weight decay), one moment pair per tensor."""

    def __init__(self, params, lr, betas, eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = list(params), lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads=None):
        self.t += 1
        b1, b2 = self.betas
        grads = [p.grad for p in self.params] if grads is None else grads
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.copy_(b1 * m + (1 - b1) * g)
            v.copy_(b2 * v + (1 - b2) * g * g)
            m_hat, v_hat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def centre_input(real, overlap, ring, fill):
    """Paper Fig. 2: G predicts the central 64x64 of 128 px. ring visible (paper, official): only
    the inner square, `overlap` px in from the region's edge, is filled; hidden (seed): the whole
    64x64."""
    a, b = (32 + overlap, 96 - overlap) if ring == "visible" else (32, 96)
    masked = real.clone()
    for c in range(3):
        masked[:, c, a:b, a:b] = MEAN_FILL[c] if fill == "mean" else 0.0
    return masked, real[:, :, 32:96, 32:96]


def centre_rec(fake, target, overlap, ring_weight, reduction):
    """Eq. (1) on the 64x64 region, ring_weight on its outer `overlap`-px ring. all (official
    wtl2Matrix): mean over every element of W d^2; split (seed): w mean_ring + mean_inner."""
    ring = torch.ones(64, 64, dtype=torch.bool)
    ring[overlap:64 - overlap, overlap:64 - overlap] = False
    d2 = (fake - target) ** 2
    if reduction == "all":
        return (d2 * torch.where(ring, ring_weight, 1.0)).mean()
    return ring_weight * d2[:, :, ring].mean() + d2[:, :, ~ring].mean()


def hidden_rim(hole, overlap):
    """Hidden pixels with a visible pixel within `overlap` px (chessboard distance), by shifting the
    visible map in every direction; outside the image is not context."""
    visible = F.pad((~hole).float(), (overlap,) * 4)
    near = torch.zeros_like(hole)
    for dy in range(2 * overlap + 1):
        for dx in range(2 * overlap + 1):
            near |= visible[..., dy:dy + S, dx:dx + S] > 0
    return hole & near


def image_weights(hole, a, rim=None):
    """W for random masks. rec-loss hole (paper's masked Eq. 1): 0 visible, 1 hidden,
    overlap_weight on the hidden rim. image (official train_random.lua:412-437): 1 hidden,
    overlap_weight on every visible pixel when overlap > 0."""
    if a.rec_loss == "hole":
        rim = hidden_rim(hole, a.overlap) if rim is None else rim
        return torch.where(hole, torch.where(rim, a.overlap_weight, 1.0), 0.0)
    return torch.where(hole, 1.0, a.overlap_weight if a.overlap > 0 else 1.0)


def reference_step(real, hole, G, D, optG, optD, a, rim=None, old_d_for_g=False, d_after=None):
    """One iteration of paper 3.2: the hole, one G forward, the D update (Eq. 2), the G update
    (Eq. 3) with the updated D (PyTorch's DCGAN; old_d_for_g: the official train.lua's D output
    from before the update, to show the test can tell). d_after: the project's D weights after
    its update; D's own update is checked against them, then G's step goes on from them, so that
    G's gradients are compared from the same D. Returns the step's 5 statistics."""
    if a.mask == "center":
        masked, target = centre_input(real, a.overlap, a.ring, a.fill)
    else:
        masked = real.clone()
        for c in range(3):
            masked[:, c][hole[:, 0]] = MEAN_FILL[c] if a.fill == "mean" else 0.0
        target = real                                  # random masks: the whole image
    fake = G(masked)
    zero = torch.zeros(())
    loss_d = loss_adv = logit_real = logit_fake = zero
    if a.lam_adv > 0:
        for p in D.parameters():
            p.requires_grad_(True)
            p.grad = None
        logit_real, logit_fake = D(target), D(fake.detach())
        loss_d = bce(logit_real, 1.0) + bce(logit_fake, 0.0)          # Eq. (2): real 1, fake 0
        if a.d_reduction == "mean":
            loss_d = loss_d / 2
        loss_d.backward()
        D_before = copy.deepcopy(D) if old_d_for_g else None
        optD.step()
        if d_after is not None:
            with torch.no_grad():
                for p, q in zip(D.parameters(), d_after):
                    assert_close_update(q, p, a.lr_d, "D")
                    p.copy_(q)
        for p in [*D.parameters(), *(D_before.parameters() if old_d_for_g else ())]:
            p.requires_grad_(False)                    # G's loss does not train D
        loss_adv = bce((D_before or D)(fake), 1.0)     # non-saturating: G wants D(G(x)) = 1
    if a.mask == "center":
        loss_rec = centre_rec(fake, target, a.overlap, a.overlap_weight, a.rec_reduction)
    else:
        loss_rec = (image_weights(hole, a, rim) * (fake - target) ** 2).mean()
    loss_g = a.lam_rec * loss_rec + a.lam_adv * loss_adv                # Eq. (3)
    for p in G.parameters():
        p.grad = None
    loss_g.backward()
    optG.step()
    return torch.stack([loss_d, loss_rec, loss_adv, torch.sigmoid(logit_real).mean(),
                        torch.sigmoid(logit_fake).mean()]).detach()


# ------------------------------------------------------------------------------------------------
# Set-up and comparison

def setup(**flags):
    """(args, the project's training namespace, reference G, D, and their plain Adams)."""
    a = ce_train.default_args(**{**TINY, **WIRING, **flags})
    torch.manual_seed(0)
    m = ce_train.build_training(a, cli.Hardware("cpu"))
    G, D = copy.deepcopy(m.G), copy.deepcopy(m.D)
    optG = PlainAdam(G.parameters(), a.lr_g, (a.beta1, a.beta2))
    optD = PlainAdam(D.parameters(), a.lr_d, (a.beta1, a.beta2))
    m.G.train(), m.D.train(), G.train(), D.train()
    return a, m, G, D, optG, optD


def batch(k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.rand(B, 3, S, S, generator=g) * 2 - 1


BOXES = ([(40, 90, 30, 100), (0, 50, 0, 60), (70, 128, 20, 60), (10, 40, 90, 128)],
         [(20, 70, 50, 110), (60, 128, 0, 128), (0, 128, 100, 128), (50, 60, 50, 70)])


def rectangles(k):
    """Hand-made holes of step k, one rectangle per image (some touch the border, where the rim
    stops: outside the image is not context), and their hidden rim worked out from the sides."""
    hole = torch.zeros(B, 1, S, S, dtype=torch.bool)
    rim = torch.zeros_like(hole)
    o = WIRING["overlap"]
    for i, (r0, r1, c0, c1) in enumerate(BOXES[k]):
        hole[i, 0, r0:r1, c0:c1] = rim[i, 0, r0:r1, c0:c1] = True
        top, bottom = (r0 + o if r0 > 0 else r0), (r1 - o if r1 < S else r1)
        left, right = (c0 + o if c0 > 0 else c0), (c1 - o if c1 < S else c1)
        rim[i, 0, top:bottom, left:right] = False
    return hole, rim


def masks_for(a, k, source):
    """(numbers for ce_train.train_step, hole, rim or None) of step k."""
    if a.mask == "center":
        return (), None, None
    if source == "hand":
        hole, rim = rectangles(k)
        return (hole,), hole, rim
    key = (a.seed, "mask", k)
    numbers = ce_masks.mask_numbers(a.mask, B, key, S)
    return numbers, ce_masks.random_masks(a.mask, B, key, S), None


def grad_error(p, q):
    """max |p.grad - q.grad| as a share of q.grad's largest element."""
    return ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item()


def assert_same_state(ours, ref):
    """Every gradient (to 1e-4 of the tensor's largest) and BatchNorm buffer of `ours` equals the
    reference's."""
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            err = grad_error(p, q)
            assert err < 1e-4, f"gradient {name}: max diff {err:.3g} of its largest"
    for (name, b), c in zip(ours.named_buffers(), ref.buffers()):
        assert torch.allclose(b.float(), c.float(), rtol=1e-5, atol=1e-6), f"buffer {name}"


def assert_close_update(p, q, lr, name):
    """The project's weight p after a step equals the transcription's q wherever q's gradient is
    clear of Adam's eps: at |g| ~ eps = 1e-8 the first update g / (|g| + eps) turns rounding into a
    sizeable part of lr. (The exact check is Adam applied to the project's own gradients.)"""
    firm = q.grad.abs() > 1e-5 if q.grad is not None else torch.ones_like(q, dtype=torch.bool)
    assert torch.allclose(p[firm], q[firm], rtol=0, atol=1e-2 * lr), name


def sync(ref, ours):
    """The reference network takes the project's weights and buffers (each step starts equal:
    Adam's first steps are about sign(g), so a gradient ~1e-9 that rounds differently would move
    a weight by a sizeable part of lr and make the next step's gradients drift)."""
    ref.load_state_dict(ours.state_dict())


PAPER = {k: getattr(ce_train.default_args(), k) for k in WIRING}   # the paper's values of these
CASES = {   # name: (flags, mask source); the first and the region-hole case run two steps
    "centre-visible": (dict(mask="center"), None),
    "centre-paper-values": (dict(mask="center", **PAPER), None),
    "centre-seed": (dict(mask="center", ring="hidden", fill="zero", rec_reduction="split",
                         d_reduction="mean"), None),
    "centre-l2-only": (dict(mask="center", lam_adv=0.0), None),
    "region-hole": (dict(mask="region", rec_loss="hole"), "masks"),
    "region-image": (dict(mask="region", rec_loss="image"), "masks"),
    "block-image-no-overlap": (dict(mask="block", rec_loss="image", overlap=0), "masks"),
    "hand-hole-zero-fill": (dict(mask="block", rec_loss="hole", fill="zero"), "hand"),
    "hand-image-l2-only": (dict(mask="block", rec_loss="image", lam_adv=0.0), "hand"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_equals_the_transcription(case):
    """One or two steps, each from the same weights: the losses, D(y), D(G(x)), every gradient and
    BatchNorm buffer of G and D equal the transcription's; each weight moved by Adam with its
    network's lr and the betas, applied to the step's gradients (step 2 is where the betas show)."""
    flags, source = CASES[case]
    a, m, G, D, optG, optD = setup(**flags)
    D0 = copy.deepcopy(m.D)
    adam = {net: (PlainAdam([p.detach().clone() for p in net.parameters()], lr,
                            (a.beta1, a.beta2)))
            for net, lr in ((m.G, a.lr_g), (m.D, a.lr_d))}
    for k in range(2 if case in ("centre-visible", "region-hole") else 1):
        real = batch(k)
        numbers, hole, rim = masks_for(a, k, source)
        sync(G, m.G), sync(D, m.D)
        before = {net: [p.detach().clone() for p in net.parameters()] for net in adam}
        got = ce_train.train_step(real, numbers, m, a)
        d_after = [p.detach() for p in m.D.parameters()] if a.lam_adv > 0 else None
        want = reference_step(real, hole, G, D, optG, optD, a, rim, d_after=d_after)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"step {k}: {got} vs {want}"
        assert_same_state(m.G, G), assert_same_state(m.D, D)
        for net, shadow in adam.items():
            grads = [p.grad for p in net.parameters()]
            if grads[0] is None:
                continue
            for x, w in zip(shadow.params, before[net]):
                x.copy_(w)
            shadow.step(grads)
            for (name, p), q in zip(net.named_parameters(), shadow.params):
                assert torch.allclose(p, q, rtol=1e-5, atol=1e-8), f"step {k}: Adam on {name}"
        for (name, p), q in zip(m.G.named_parameters(), G.parameters()):
            assert_close_update(p, q, a.lr_g, f"step {k}: G {name}")
    if a.lam_adv == 0:       # L2 only: D never runs (its BatchNorm statistics are untouched too)
        assert got[0] == got[2] == 0 and got[3] == got[4] == 0.5
        assert all(torch.equal(x, y) for x, y in zip(m.D.state_dict().values(),
                                                       D0.state_dict().values()))
        assert all(p.grad is None for p in m.D.parameters()) and not m.optD.state
    else:
        assert not torch.equal(next(m.D.parameters()), next(D0.parameters()))


def test_the_generator_step_uses_the_updated_discriminator():
    """The D step comes first and G's adversarial term is computed with the updated D (the
    DEVIATION in train_step: PyTorch's DCGAN). The official order (D's output from before its
    update) gives other gradients here, so the comparison can tell the two apart."""
    a, m, G, D, optG, optD = setup(mask="center", lam_rec=0.5, lam_adv=0.5, lr_d=0.05)
    G_old, D_old = copy.deepcopy(G), copy.deepcopy(D)
    real = batch(0)
    ce_train.train_step(real, (), m, a)
    reference_step(real, None, G, D, optG, optD, a, d_after=list(m.D.parameters()))
    betas = (a.beta1, a.beta2)
    reference_step(real, None, G_old, D_old, PlainAdam(G_old.parameters(), a.lr_g, betas),
                   PlainAdam(D_old.parameters(), a.lr_d, betas), a, old_d_for_g=True)
    assert_same_state(m.G, G)
    official = max(grad_error(p, q) for p, q in zip(m.G.parameters(), G_old.parameters()))
    assert official > 1e-2, official


def test_each_optimiser_has_its_own_networks_rate_and_betas():
    """Paper 4 / official train.lua: Adam for both, beta1 0.5; G at --lr-g (10x), D at --lr-d; no
    weight decay. Defaults, then distinct flags, so that a swap or a hard-coded value shows."""
    for flags in (dict(), WIRING):
        a = ce_train.default_args(**{**TINY, **flags})
        m = ce_train.build_training(a, cli.Hardware("cpu"))
        for opt, net, lr in ((m.optG, m.G, a.lr_g), (m.optD, m.D, a.lr_d)):
            assert isinstance(opt, torch.optim.Adam)
            (group,) = opt.param_groups
            assert [id(p) for p in group["params"]] == [id(p) for p in net.parameters()]
            assert group["lr"] == lr and group["betas"] == (a.beta1, a.beta2)
            assert group["eps"] == 1e-8 and group["weight_decay"] == 0
            assert not group["amsgrad"] and not group["maximize"]
    paper = ce_train.default_args()
    assert (paper.lr_g, paper.lr_d, paper.beta1, paper.beta2) == (0.002, 0.0002, 0.5, 0.999)
    assert (paper.lam_rec, paper.lam_adv, paper.overlap_weight) == (0.999, 0.001, 10.0)
