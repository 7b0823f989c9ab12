"""The learned realism scorer: a small CNN that tells reference craters from base-model samples.

The realism reward component is the logit of this classifier, trained once on reference images
(label 1, "real") against samples of the base diffusion model (label 0, "fake") and then frozen.
Its held-out accuracy and AUC are reported with it (RealismMetrics), so that a scorer that cannot
tell the two sets apart (accuracy near 0.5) is visible before anyone optimises against it.

Notation
--------
x        an image batch in model space, (B, C, H, W) float in [-1, 1]
C        channels (1 for the grayscale Mars tiles)
y        label: 1 = real (reference set), 0 = fake (base-model samples)
s(x)     the logit, forward(x): (B,); sigmoid(s) estimates P(real | x)
w        `width`, channels of the first conv block (the last two have 2 w)

Artifact: `realism.safetensors` holds the state dict; its safetensors metadata holds
`format` = "craterdiff.realism", `version` and `config` (RealismArchitecture as JSON), so that
`load_realism` rebuilds the network exactly without running any code from the file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from basics import CraterdiffError, first_line

REALISM_FILENAME = "realism.safetensors"
"""File name of the scorer inside a reward artifact directory."""

REALISM_FILE_FORMAT = "craterdiff.realism"
REALISM_FILE_VERSION = "1"

MIN_IMAGES = 8
"""Fewest images per class train_realism accepts (a couple go to the held-out part)."""

MIN_SIZE = 16
"""Smallest image side the network accepts (three stride-2 blocks leave 2 x 2 at 16 px)."""


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RealismArchitecture:
    """Constructor arguments of RealismCNN, stored in the artifact to rebuild it."""

    channels: int = 1
    """Image channels C (1 for the grayscale Mars tiles, 3 for RGB sets)."""
    width: int = 32
    """Channels w of the first block (later blocks have 2 w); 16-64 is sensible, 32 has ~65k parameters."""


def _group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (a divisor of ch): batch-independent, so eval == train."""
    return nn.GroupNorm(math.gcd(8, ch), ch)


class RealismCNN(nn.Module):
    """Small convolutional classifier: x (B, C, H, W) in [-1, 1] -> logits s(x) (B,).

    stem conv3x3 (C -> w) | three blocks conv3x3 stride 2 + GroupNorm + LeakyReLU(0.2)
    (w -> w -> 2w -> 2w) | global average pool | linear (2w -> 1).
    Any H, W >= 16 works (the pooling makes the head size-independent).
    """

    def __init__(self, channels: int = 1, width: int = 32):
        super().__init__()
        if channels < 1 or width < 1:
            raise ValueError(f"need channels >= 1 and width >= 1, got {channels}, {width}")
        self.config = RealismArchitecture(channels=channels, width=width)
        w = width
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731

        def down(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), _group_norm(cout), act())

        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), act(),
            down(w, w), down(w, 2 * w), down(2 * w, 2 * w),
        )
        self.head = nn.Linear(2 * w, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.channels or min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"expected (B, {self.config.channels}, H, W) images with H, W >= {MIN_SIZE}, "
                             f"got shape {tuple(x.shape)}")
        h = self.features(x).mean(dim=(-2, -1))
        return self.head(h).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------

def augment(x: Tensor, *, generator: torch.Generator, max_shift: int = 3, brightness: float = 0.1,
            contrast: float = 0.1, noise_std: float = 0.02) -> Tensor:
    """Realism-preserving augmentation of a batch x (B, C, H, W) in [-1, 1] -> same shape, in [-1, 1].

    Per image, in this order (all draws from `generator`, a CPU torch.Generator, so the result is
    a function of x and the generator state):
    1. translation by (dy, dx), each uniform in {-max_shift..max_shift}: reflect-pad by max_shift,
       then crop H x W at the drawn offset;
    2. contrast and brightness about the image mean m: x' = m + c (x - m) + b with
       c ~ U(1 - contrast, 1 + contrast), b ~ U(-brightness, brightness) (c > 0 keeps the sign of
       every gradient);
    3. Gaussian noise of std `noise_std`; then clamp to [-1, 1].

    Deliberately NO flips and NO rotations: the tiles are shaded relief, lit from one direction, and
    a flipped or rotated crater is lit from another side (the bright rim swaps sides). The light
    direction is part of what a real tile looks like, so those would teach the scorer that wrong
    lighting is real. Scale changes are left out too: crater size in pixels is part of the set.
    """
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if max_shift >= min(h, w):
        raise ValueError(f"max_shift {max_shift} must be smaller than the image side {min(h, w)}")
    if not (0 <= contrast < 1):
        raise ValueError(f"contrast must be in [0, 1), got {contrast}")
    dev, dt = x.device, x.dtype
    # 1. translation (reflect-pad, then gather each image's crop)
    if max_shift > 0:
        off = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(dev)
        xp = nn.functional.pad(x, (max_shift,) * 4, mode="reflect")
        rows = (off[0][:, None] + torch.arange(h, device=dev))[:, :, None]   # (B, H, 1)
        cols = (off[1][:, None] + torch.arange(w, device=dev))[:, None, :]   # (B, 1, W)
        x = xp[torch.arange(b, device=dev)[:, None, None], :, rows, cols]    # (B, H, W, C)
        x = x.permute(0, 3, 1, 2)
    # 2. contrast and brightness about each image's mean
    u = torch.rand(2, b, 1, 1, 1, generator=generator).to(dev, dt)
    gain = 1 + contrast * (2 * u[0] - 1)
    bias = brightness * (2 * u[1] - 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = m + gain * (x - m) + bias
    # 3. noise
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=generator).to(dev, dt)
    return x.clamp(-1, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RealismMetrics:
    """How well the scorer separates real from fake. Accuracies are at logit 0 (P(real) = 0.5)
    and balanced: the mean of the accuracy on real and on fake images, so that unequal class
    sizes cannot inflate them (0.5 = chance)."""

    heldout_accuracy: float
    """Balanced accuracy on the held-out images (no augmentation); the number to trust."""
    heldout_auc: float
    """ROC AUC of the logit on the held-out images (sklearn.metrics.roc_auc_score); 0.5 = chance."""
    train_accuracy: float
    """Balanced accuracy on the training images (no augmentation); far above held-out = overfit."""
    n_real_train: int
    n_fake_train: int
    n_real_heldout: int
    n_fake_heldout: int
    epochs: int
    """Passes over the larger class's training images."""


def _check_sets(real: Tensor, fake: Tensor) -> None:
    """One-line CraterdiffErrors for image sets the scorer cannot be trained on."""
    for name, x in (("real", real), ("fake", fake)):
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise CraterdiffError(f"realism scorer: {name} images must be a (N, C, H, W) tensor, got {shape}")
        if x.shape[0] < MIN_IMAGES:
            raise CraterdiffError(f"realism scorer needs at least {MIN_IMAGES} {name} images, got {x.shape[0]}: "
                                  f"provide more {'reference images' if name == 'real' else 'base-model samples'}")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise CraterdiffError(f"realism scorer needs images of at least {MIN_SIZE} px, {name} images are "
                                  f"{x.shape[-2]}x{x.shape[-1]}: use a larger image size")
        if not torch.isfinite(x).all():
            raise CraterdiffError(f"realism scorer: {name} images contain NaN or inf values: check the images")
    if real.shape[1:] != fake.shape[1:]:
        raise CraterdiffError(f"realism scorer: real images are {tuple(real.shape[1:])} (C, H, W) but fake images "
                              f"are {tuple(fake.shape[1:])}: load both at the same size and channels")


def _split(n: int, heldout_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random (train, held-out) index split of range(n); at least 1 image on each side."""
    n_held = min(n - 1, max(1, round(heldout_fraction * n)))
    perm = torch.randperm(n, generator=generator)
    return perm[n_held:], perm[:n_held]


def _index_stream(n: int, length: int, generator: torch.Generator) -> Tensor:
    """`length` indices into range(n): concatenated random permutations (every image once per pass)."""
    reps = -(-length // n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)])[:length]


def _balanced_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Mean over the two classes of the fraction classified right at logit 0."""
    pred = logits > 0
    real = labels > 0.5
    return 0.5 * (pred[real].float().mean().item() + (~pred[~real]).float().mean().item())


def train_realism(
    real: Tensor,
    fake: Tensor,
    *,
    heldout_fraction: float = 0.25,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    width: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[RealismCNN, RealismMetrics]:
    """Train RealismCNN to give real images (label 1) a high logit and fake ones (label 0) a low one.

    real: (N_r, C, H, W) reference images in [-1, 1]; fake: (N_f, C, H, W) base-model samples.
    Each set is split at random (seeded) into train and held-out parts, round(heldout_fraction * N)
    held out (at least one image each side). Training minimises BCE-with-logits with AdamW on
    augmented (see `augment`) class-balanced batches: every batch has batch_size // 2 real and
    batch_size - batch_size // 2 fake images, the smaller class cycled; an epoch is one pass over
    the larger class's training images. The held-out images are scored without augmentation.

    heldout_fraction: usually 0.2-0.3. epochs: 20-50 is typical for ~100-1000 images per class.
    lr: AdamW step size, 3e-4 to 3e-3. weight_decay: AdamW decoupled decay, 0 to 1e-3.
    width: RealismArchitecture.width. seed: everything random (split, init, batches, augmentation) is
    drawn from it without touching the global RNG; same seed on CPU gives the same model.
    progress: print one line per epoch (loss) to stderr.

    Returns (model in eval mode with requires_grad False, metrics). Raises CraterdiffError for
    fewer than MIN_IMAGES images per class, images below MIN_SIZE px, or mismatched shapes.
    """
    _check_sets(real, fake)
    if not (0 < heldout_fraction < 1):
        raise CraterdiffError(f"realism heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if epochs < 1 or batch_size < 2:
        raise CraterdiffError(f"realism training needs epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    real, fake = real.detach().float().cpu(), fake.detach().float().cpu()
    r_tr, r_ho = _split(len(real), heldout_fraction, gen)
    f_tr, f_ho = _split(len(fake), heldout_fraction, gen)

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = RealismCNN(channels=real.shape[1], width=width)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    train = real[r_tr], fake[f_tr]
    _fit(model, opt, *train, epochs=epochs, batch_size=batch_size, generator=gen, progress=progress)
    model.eval().requires_grad_(False)
    return model, _metrics(model, train, (real[r_ho], fake[f_ho]), epochs=epochs)


def _fit(model: RealismCNN, opt: torch.optim.Optimizer, real: Tensor, fake: Tensor, *, epochs: int, batch_size: int,
         generator: torch.Generator, progress: bool) -> None:
    """`epochs` passes of BCE-with-logits over class-balanced augmented batches of the training images (real
    (N_r, C, H, W) labelled 1, fake (N_f, C, H, W) labelled 0; see train_realism)."""
    device = next(model.parameters()).device
    loss_fn = nn.BCEWithLogitsLoss()
    n_r, n_f = batch_size // 2, batch_size - batch_size // 2
    steps = max(1, -(-max(len(real), len(fake)) // max(n_r, n_f)))  # per epoch
    labels = torch.cat([torch.ones(n_r), torch.zeros(n_f)]).to(device)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        ir = _index_stream(len(real), steps * n_r, generator).view(steps, n_r)
        jf = _index_stream(len(fake), steps * n_f, generator).view(steps, n_f)
        total = 0.0
        for s in range(steps):
            mb_x = augment(torch.cat([real[ir[s]], fake[jf[s]]]), generator=generator).to(device)
            loss = loss_fn(model(mb_x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        if progress:
            print(f"realism epoch {epoch + 1}/{epochs}: loss {total / steps:.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


def _metrics(model: RealismCNN, train: tuple[Tensor, Tensor], heldout: tuple[Tensor, Tensor], *,
             epochs: int) -> RealismMetrics:
    """Balanced accuracy on the (real, fake) training and held-out images, and the held-out ROC AUC."""
    from sklearn.metrics import roc_auc_score  # here: scikit-learn costs ~0.7 s to import, and scoring needs none

    def scored(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
        return realism_logits(model, torch.cat([real, fake])), torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
    s_tr, y_tr = scored(*train)
    s_ho, y_ho = scored(*heldout)
    return RealismMetrics(
        heldout_accuracy=_balanced_accuracy(s_ho, y_ho),
        heldout_auc=float(roc_auc_score(y_ho.numpy(), s_ho.double().numpy())),
        train_accuracy=_balanced_accuracy(s_tr, y_tr),
        n_real_train=len(train[0]), n_fake_train=len(train[1]),
        n_real_heldout=len(heldout[0]), n_fake_heldout=len(heldout[1]),
        epochs=epochs,
    )


@torch.no_grad()
def realism_logits(model: RealismCNN, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """Logits s(x) of `images` (N, C, H, W) in [-1, 1] -> (N,) float32 on the CPU.

    Runs on the model's device in chunks of batch_size, in eval mode (restored afterwards).
    """
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model(images[i:i + batch_size].to(device, torch.float32)).float().cpu()
               for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------------
# Artifact
# ----------------------------------------------------------------------------------------------

def _resolve(path: str | Path) -> Path:
    """A directory means the REALISM_FILENAME inside it; anything else is the file itself."""
    path = Path(path)
    return path / REALISM_FILENAME if path.is_dir() else path


def save_realism(model: RealismCNN, path: str | Path) -> Path:
    """Write the scorer as safetensors (atomically: temp file, then rename); return the file written.

    path: the file (conventionally `<artifact>/realism.safetensors`) or an existing directory, in
    which case REALISM_FILENAME inside it. The metadata holds format, version and config (JSON).
    """
    path = _resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": REALISM_FILE_FORMAT, "version": REALISM_FILE_VERSION,
                "config": json.dumps(dataclasses.asdict(model.config))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_realism(path: str | Path) -> RealismCNN:
    """Rebuild a scorer written by save_realism: eval mode, requires_grad False, on the CPU.

    path: the file or its directory (see save_realism). Reads safetensors only; no code from the
    file is run. A missing, truncated or foreign file raises CraterdiffError naming it.
    """
    path = _resolve(path)
    if not path.is_file():
        raise CraterdiffError(f"realism scorer {path} not found: rebuild the reward artifact (it trains the scorer)")
    redo = "rebuild the reward artifact"
    try:
        state = load_file(path, device="cpu")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CraterdiffError(f"realism scorer {path} is not a readable safetensors file "
                              f"({first_line(e)}): {redo}") from None
    if meta.get("format") != REALISM_FILE_FORMAT:
        raise CraterdiffError(f"realism scorer {path} is not a {REALISM_FILE_FORMAT} file "
                              f"(format {meta.get('format')!r}): {redo}")
    if meta.get("version") != REALISM_FILE_VERSION:
        raise CraterdiffError(f"realism scorer {path} has version {meta.get('version')!r}, this code reads "
                              f"{REALISM_FILE_VERSION!r}: {redo}")
    try:
        cfg = RealismArchitecture(**json.loads(meta["config"]))
        model = RealismCNN(channels=int(cfg.channels), width=int(cfg.width))
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CraterdiffError(f"realism scorer {path} does not match its stored config ({first_line(e)}): {redo}"
                              ) from None
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise CraterdiffError(f"realism scorer {path} holds NaN or inf weights: {redo}")
    return model.eval().requires_grad_(False)
