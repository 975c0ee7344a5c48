"""Fine-tuning the encoder end to end (paper 5.2, Table 2: inpainting weights vs a random init) and
the starts it and the linear probe share: a checkpoint's encoder, its random init, or that init
rescaled by the data-dependent initialisation of Krähenbühl et al. 2016 (data_dependent_init); plus
the random crop + mirror both train on. The protocol is in ce_probe.py's docstring; run it there:

    python ce_probe.py --data folder --data-root DIR --ckpt runs/shapes/best.pt \\
        --random-init dcgan --ddi-init dcgan --finetune
"""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import ce_data
import ce_model
from ce_utils import checkpoints
from ce_utils.cli import DataError
from ce_utils.progress import Progress


# ------------------------------------------------------------------------------------------------
# Augmentation: random crop + mirror, drawn per image and epoch (Zhang et al.'s linear test)


def aug_draws(n, load, size, seed, epoch):
    """Crop offsets (n, 2) and mirror flags (n,) of one epoch: stateless (ce_data.seeded), so every
    start and every layer's classifier sees the same crops; all zero when load == size."""
    g = ce_data.seeded(seed, "augment", epoch)
    off = torch.randint(0, load - size + 1, (n, 2), generator=g)
    return off, torch.rand(n, generator=g) < 0.5


def crop_flip(images, off, flip, size):
    """uint8 (B, L, L, 3) -> (B, size, size, 3): image k cropped at rows/cols off[k] and mirrored
    where flip[k], on the images' device."""
    off, flip = off.to(images.device), flip.to(images.device)
    if images.shape[1] > size:
        ar = torch.arange(size, device=images.device)
        rows, cols = off[:, :1] + ar, off[:, 1:] + ar                     # (B, size)
        batch = torch.arange(len(images), device=images.device)[:, None, None]
        images = images[batch, rows[:, :, None], cols[:, None, :]]
    return torch.where(flip[:, None, None, None], images.flip(2), images)

# ------------------------------------------------------------------------------------------------
# Encoders: the three starts (random, data-dependent, a checkpoint's weights)


def random_init_generator(a):
    """The generator a run with args `a` started from: the global seed, then the run's builder."""
    torch.manual_seed(a.get("seed", 0))
    return ce_model.build_generator(a)


@torch.no_grad()
def data_dependent_init(encoder, x):
    """Krähenbühl et al. 2016's within-layer initialisation (their between-layer scaling is not
    done): run real images x (B, 3, S, S) through the encoder layer by layer and rescale each conv
    so that its pre-activation outputs on x have per-channel mean 0 and std 1. A conv's weights
    take the std and its bias the mean; a BatchNorm after it gets x's statistics as its running
    ones and affine (1, 0), so eval-mode outputs keep them; a conv with neither bias nor BN (the
    paper DCGAN's conv1) keeps its mean."""
    encoder.eval()
    for m in encoder:
        if isinstance(m, nn.Conv2d):
            z = m(x)                                                     # (B, C, H, W)
            mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3), unbiased=False)
            std = torch.where(std > 0, std, torch.ones_like(std))        # a dead channel stays
            m.weight.div_(std[:, None, None, None])
            if m.bias is not None:
                m.bias.sub_(mean).div_(std)
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(x.mean((0, 2, 3)))
            m.running_var.copy_(x.var((0, 2, 3), unbiased=False))
            m.weight.fill_(1.0)
            m.bias.zero_()
        x = m(x)
    return encoder


def ddi_images(images, size, n, seed):
    """The real images of the data-dependent init: n training images (a seeded choice), centre
    crop, (n, 3, size, size) in [-1, 1]."""
    idx = torch.randperm(len(images), generator=ce_data.seeded(seed, "ddi"))[:n]
    return ce_data.to_float(ce_data.center_crop(images[idx], size))


def build_encoder(spec, device, images=None):
    """(encoder on `device`, taps) of a model spec: a checkpoint's G, its random init, or that
    random init after data_dependent_init on `images` (spec["ddi"])."""
    if spec["weights"] is None:
        G = random_init_generator(spec["a"])
    else:
        G = ce_model.build_generator(spec["a"], init="none")
        try:
            G.load_state_dict(spec["weights"])
        except RuntimeError as e:
            raise checkpoints.CheckpointError(f"{spec['ckpt']}: weights do not match the saved "
                                              f"flags ({str(e).splitlines()[0]})") from None
    encoder = G.encoder.to(device)
    if spec.get("ddi"):
        data_dependent_init(encoder, images.to(device))
    return encoder, ce_model.encoder_taps(G)


def _ddi_batch(spec, images, size, args):
    """The images a ddi start is initialised on (None for the other starts)."""
    return ddi_images(images, size, args.ddi_images, args.probe_seed) if spec.get("ddi") else None

# ------------------------------------------------------------------------------------------------
# Fine-tuning (end to end), one model spec at a time


def finetune(encoder, head, images, labels, size, args, label="model"):
    """Train encoder + head end to end on uint8 images (N, L, L, 3) (paper Table 2's test; see the
    module docstring): cross-entropy, SGD with momentum 0.9, cosine learning rate; batches are
    slices of a seeded per-epoch order, cropped and mirrored by aug_draws: every start sees the same
    batches in the same order. Returns the top-1 % on the last epoch's (augmented) batches."""
    dev, n, bs = images.device, len(images), args.ft_batch
    steps = n // bs                                  # the last partial batch is dropped
    opt = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=args.ft_lr,
                          momentum=0.9, weight_decay=args.ft_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.ft_epochs * steps)
    show = Progress(args.ft_epochs, f"{label}: fine-tuning", "epochs", "epochs/s", every=1.0)
    encoder.train(), head.train()
    for ep in range(args.ft_epochs):
        perm = torch.randperm(n, generator=ce_data.seeded(args.probe_seed, "order", ep))
        off, flip = aug_draws(n, images.shape[1], size, args.probe_seed, ep)
        perm, off, flip = ce_data.to_device(dev, perm, off, flip & args.augment)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        for s in range(0, steps * bs, bs):
            i = perm[s:s + bs]
            x = ce_data.to_float(crop_flip(images[i], off[i], flip[i], size))
            y = labels[i]
            logits = head(encoder(x).flatten(1))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * bs
            correct += (logits.argmax(1) == y).sum()
        show(ep + 1, f" loss {loss_sum.item() / (steps * bs):.3f}")   # host sync once an epoch
    return 100.0 * correct.item() / (steps * bs)


@torch.no_grad()
def recompute_bn_stats(encoder, images, size, batch_size=64):
    """BatchNorm running statistics recomputed as plain averages over the centre crops of uint8
    images (N, L, L, 3) ("precise BN"): after a short fine-tuning the running averages (momentum
    0.1, from the init's 0 and 1) have not caught up, and eval mode would score them, not the
    weights."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                                 # cumulative average over the batches
    encoder.train()
    dev = next(encoder.parameters()).device
    for s in range(0, len(images), batch_size):
        x = ce_data.to_float(ce_data.center_crop(images[s:s + batch_size], size).to(dev))
        if len(x) > 1:                                    # train-mode BN needs 2+ images
            encoder(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    encoder.eval()


@torch.no_grad()
def heldout_top1(encoder, head, images, labels, size, batch_size=64):
    """Top-1 % of encoder + head (eval mode) on the centre crops of uint8 images (N, L, L, 3)."""
    encoder.eval(), head.eval()
    dev = next(head.parameters()).device
    correct = torch.zeros((), device=dev, dtype=torch.long)
    for s in range(0, len(images), batch_size):
        x = ce_data.to_float(ce_data.center_crop(images[s:s + batch_size], size).to(dev))
        correct += (head(encoder(x).flatten(1)).argmax(1) == labels[s:s + batch_size].to(dev)).sum()
    return 100.0 * correct.item() / len(images)


def _check_batch(n, batch_size):
    if n < batch_size:
        raise DataError(f"the training split has {n} images, fewer than one fine-tuning batch "
                        f"of {batch_size}; lower --ft-batch")


def finetune_model(spec, data, args, n_classes):
    """Fine-tune one start (a checkpoint's encoder, its random or its ddi init) with a zero-init
    linear head on its last layer: held-out top-1 % and its standard error sqrt(p(1 - p) / n),
    training top-1 %, and how far the encoder moved (|w - w0| / |w0| over its parameters)."""
    (xtr_u8, ytr), (xva_u8, yva) = data
    _check_batch(len(xtr_u8), args.ft_batch)
    size, dev = ce_model.input_size(spec), args.device
    encoder, _ = build_encoder(spec, dev, _ddi_batch(spec, xtr_u8, size, args))
    w0 = torch.cat([p.detach().flatten() for p in encoder.parameters()])   # a copy
    with torch.no_grad():
        x = ce_data.to_float(ce_data.center_crop(xtr_u8[:2], size).to(dev))
        dims = encoder.eval()(x).flatten(1).shape[1]      # bottleneck or pool5 size
    head = nn.Linear(dims, n_classes).to(dev)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    train_top1 = finetune(encoder, head, xtr_u8.to(dev), ytr.to(dev), size, args, spec["label"])
    recompute_bn_stats(encoder, xtr_u8, size, args.extract_batch)
    top1 = heldout_top1(encoder, head, xva_u8, yva, size, args.extract_batch)
    w1 = torch.cat([p.detach().flatten() for p in encoder.parameters()])
    p, n = top1 / 100, len(yva)
    se = 100 * math.sqrt(p * (1 - p) / n)
    print(f"{spec['label']}: fine-tuned: top-1 {top1:.2f} +- {se:.2f} % held-out, "
          f"{train_top1:.2f} % train", file=sys.stderr)
    return {"top1": top1, "se": se, "train_top1": train_top1, "head_dims": dims,
            "weight_change": ((w1 - w0).norm() / w0.norm()).item()}


def print_finetune_table(results, n_train, n_val, names):
    """Rows: starts; columns: held-out top-1 % and its standard error, training top-1 %, and the
    encoder's relative weight change."""
    r0, w = results[0], max(5, *(len(r["model"]) for r in results))
    aug = "random crop + mirror" if r0["augment"] else "no augmentation"
    print(f"fine-tuning: top-1 % on {n_val} held-out images, {len(names)} classes (chance "
          f"{100 / len(names):.2f} %), encoder + linear head trained end to end on {n_train} "
          f"images, {r0['epochs']} epochs ({aug})")
    print(f"{'start':<{w}}  {'top-1':>7}  {'s.e.':>6}  {'train':>7}  {'|dw|/|w|':>8}")
    for r in results:
        print(f"{r['model']:<{w}}  {r['top1']:>7.2f}  {r['se']:>6.2f}  {r['train_top1']:>7.2f}  "
              f"{r['weight_change']:>8.3f}")
