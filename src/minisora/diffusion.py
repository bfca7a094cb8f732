"""Rectified flow as pure functions over a callable `model(x_t, t, **cond) -> out` (k-diffusion style).

Convention: x_t = (1 - t) * x0 + t * noise, t = 0 is data and t = 1 is noise; the velocity is
v = dx_t/dt = noise - x0, and sampling integrates the ODE from t = 1 down to t = 0.

t is one noise level per sample (B,), or per latent frame (B, T) of a video (B, C, T, H, W), or any tensor of
x's rank that broadcasts to it; the model receives t as given. A frame at t = 0 is clean conditioning
(image-to-video, extension): `fixed_frames` holds such frames through any sampler, and flow_loss's `mask`
leaves them out of the loss.
"""

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PREDICTIONS = ("v", "x0")


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (B,), per latent frame (B, T) of x (B, C, T, H, W), or of x's rank -> a tensor that broadcasts to x."""
    if t.ndim == x.ndim:
        return t.to(x.dtype)
    if t.ndim <= 1:
        return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)  # (B, 1, ..., 1)
    if t.ndim == 2 and x.ndim == 5 and t.shape == (x.shape[0], x.shape[2]):
        return t[:, None, :, None, None].to(x.dtype)  # (B, 1, T, 1, 1)
    raise ValueError(f"t of shape {tuple(t.shape)} does not fit x of shape {tuple(x.shape)}: expected (B,), per "
                     f"latent frame (B, T) of a (B, C, T, H, W) video, or a tensor of x's rank")  # fmt: skip


def shift_t(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 timestep shift t' = shift * t / (1 + (shift - 1) * t); shift > 1 moves time towards noise."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0,
                     max_tokens: int = 4096, max_shift: float = 3.0, floor: bool = True) -> float:
    """Timestep shift for a sample of num_tokens tokens: more tokens, noisier timesteps.

    log(shift) is linear in the token count through (base_tokens, base_shift) and (max_tokens, max_shift),
    as in Flux, and extrapolates above max_tokens; below base_tokens it stays at base_shift (floor=False:
    extrapolates there too, as diffusers' calculate_shift does for LTX-Video). Rationale (SD3, Sec. 5.3.2):
    with more tokens the same noise level destroys less of the signal, as neighbouring tokens average it
    out, so larger / longer videos need more time at high noise.
    """
    slope = (math.log(max_shift) - math.log(base_shift)) / (max_tokens - base_tokens)
    extra = max(num_tokens - base_tokens, 0) if floor else num_tokens - base_tokens
    return math.exp(math.log(base_shift) + slope * extra)


def sample_t(batch_size: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None,
             mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Training timesteps (B,) in (0, 1): logit-normal (SD3) then shifted; the median is shift_t(sigmoid(mean))."""
    gen_device = generator.device if generator is not None else device
    u = torch.randn(batch_size, generator=generator, device=gen_device) * std + mean  # (B,)
    return shift_t(torch.sigmoid(u), shift).to(device)  # (B,)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t (B,) or per frame (B, T); frames at t = 0 stay x0."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise - x0: the (constant) velocity of the straight path from data to noise."""
    return noise - x0


def to_velocity(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str,
                t_eps: float = 1e-4) -> torch.Tensor:
    """Convert a network output to velocity: "v" as is, "x0" via v = (x_t - x0_hat) / t, t clamped at t_eps."""
    if prediction == "v":
        return out
    if prediction == "x0":
        return (x_t - out) / _bcast(t, x_t).clamp(min=t_eps)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def velocity_model(model: Callable, prediction: str) -> Callable:
    """Wrap a network predicting `prediction` into a velocity callable for the samplers (exact conversion)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if prediction == "v":
        return model

    def v_model(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return to_velocity(model(x, t, **cond), x, t, prediction)

    return v_model


def flow_loss(model: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prediction: str = "v",
              t_eps: float = 0.05, mask: torch.Tensor | None = None, **cond) -> torch.Tensor:
    """Per-sample MSE (B,) between the predicted and the true velocity at x_t.

    t is (B,) or per frame (B, T) (see the module docstring) and goes to the model as given. `mask`, shaped
    like t or broadcastable to x, weights the squared error; the loss is then the mean over the weighted
    elements, so clean conditioning frames (mask 0) count for nothing. A sample with an all-zero mask gets 0.

    prediction "x0": the network predicts the clean sample, converted to velocity (x_t - x0_hat) / t; the loss is
    the same velocity MSE, i.e. an x0 loss weighted by 1/t^2, capped at t_eps (the clamp only bounds that weight
    near t = 0; sampling uses the exact conversion, see velocity_model). The calibration prototype showed that
    x0 prediction removes the leftover noise v prediction left when a token carried more values (384) than the
    model width (128): predicting a clean sample is a low-dimensional target, predicting noise is not
    (also Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").
    """
    x_t = add_noise(x0, noise, t)  # (B, ...)
    v_hat = to_velocity(model(x_t, t, **cond), x_t, t, prediction, t_eps=t_eps)  # (B, ...)
    err = F.mse_loss(v_hat.float(), velocity_target(x0, noise).float(), reduction="none")  # (B, ...)
    if mask is None:
        return err.flatten(1).mean(1)  # (B,)
    w = _bcast(mask, err).expand_as(err)  # (B, ...)
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)  # (B,)


def timesteps(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Sampling schedule (steps + 1,) from 1 to 0, uniform in t then shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_t(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift).float()


def fixed_frames(model: Callable, clean: torch.Tensor) -> Callable:
    """Velocity callable on which any sampler keeps the frames marked `clean` (B, T) exactly as they start.

    The model sees t per frame, t * (1 - clean): 0 on clean frames (conditioning, as Wan2.2 TI2V and
    LTX-Video give it), the sampler's t elsewhere; the velocity of clean frames is 0, so they never move.
    Start the sampler from x with the clean latents in those frames and noise in the rest.
    """
    keep = 1 - clean.float()  # (B, T)

    def f(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        v = model(x, t[:, None] * keep.to(t), **cond)  # (B, C, T, H, W)
        return v * _bcast(keep, v)

    return f


@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, ts: torch.Tensor, *, callback: Callable | None = None,
                 **cond) -> torch.Tensor:
    """Euler integration of dx/dt = model(x, t) from ts[0] (noise, x) to ts[-1]; one model call per step."""
    B = x.shape[0]
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        v = model(x, t.expand(B), **cond)  # (B, ...)
        if callback is not None:
            callback(dict(i=i, t=t, x=x, denoised=x - t * v))
        x = x + (t_next - t) * v
    return x


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, ts: torch.Tensor, *, callback: Callable | None = None,
                **cond) -> torch.Tensor:
    """Heun (2nd order) integration: Euler predictor, trapezoid corrector; Euler on the last step to t = 0."""
    B = x.shape[0]
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        v = model(x, t.expand(B), **cond)  # (B, ...)
        if callback is not None:
            callback(dict(i=i, t=t, x=x, denoised=x - t * v))
        x_euler = x + (t_next - t) * v
        if t_next == 0:  # an x0-predicting model is ill-defined at t = 0 (k-diffusion does the same)
            x = x_euler
        else:
            v_next = model(x_euler, t_next.expand(B), **cond)
            x = x + (t_next - t) * (v + v_next) / 2
    return x



def _log_snr(t: float) -> float:
    """lambda(t) = log(alpha / sigma) = log((1 - t) / t) on the flow path: -inf at t = 1 (noise), +inf at t = 0."""
    return math.log((1 - t) / t) if 0 < t < 1 else (-math.inf if t >= 1 else math.inf)


@torch.no_grad()
def sample_unipc(model: Callable, x: torch.Tensor, ts: torch.Tensor, *, callback: Callable | None = None,
                 **cond) -> torch.Tensor:
    """UniPC (Zhao et al. 2023; bh2, order 2, data prediction) in flow form; one model call per step.

    Each step from t to s is the exact solution for a constant clean-sample estimate, x_s = (s/t) x + (1 - s/t) x0
    (DDIM, which on this path equals Euler), with x0 extrapolated linearly in lambda = log((1 - t) / t) from the
    last two estimates (the predictor, = DPM-Solver++(2M)); the next step's model call then corrects the
    point it was made at (the corrector, UniC) at no extra cost. Steps next to t = 1 (lambda = -inf) and the
    last step to t = 0 are first order, as in diffusers' UniPCMultistepScheduler(solver_order=2,
    lower_order_final=True), which this matches to float rounding on the same grid (see tests).
    """
    B = x.shape[0]
    ts_f = [float(t) for t in ts]
    lam = [_log_snr(t) for t in ts_f]
    x0s: list[torch.Tensor] = []  # clean-sample estimates at ts[0], ts[1], ...
    x_start = x  # where the last step started from (what the corrector redoes)
    for i in range(len(ts) - 1):
        t, s = ts_f[i], ts_f[i + 1]
        x0 = x - t * model(x, ts[i].expand(B), **cond)  # (B, ...)
        if i > 0:  # UniC: redo the step ts[i-1] -> t with this estimate, x0 at ts[i-1] and (order 2) at ts[i-2]
            t0, m0 = ts_f[i - 1], x0s[-1]
            base = (t / t0) * x_start + (1 - t / t0) * m0
            h = lam[i] - lam[i - 1]
            if i > 1:  # order 2
                phi1 = math.expm1(-h) / -h - 1  # phi terms of the bh2 variant, divided by B(h) = expm1(-h)
                b1, b2 = phi1 / math.expm1(-h), 2 * (phi1 / -h - 0.5) / math.expm1(-h)
                r = (lam[i - 2] - lam[i - 1]) / h  # < 0: the earlier point, in units of this step
                # r = -inf (that point is t = 1): its weight tends to 0, the limit of diffusers' sigma_max -> 1
                rho0 = (b1 - b2) / (1 - r) if math.isfinite(r) else 0.0
                earlier = rho0 * (x0s[-2] - m0) / r if rho0 else 0.0
                x = base + (1 - t / t0) * (earlier + (b1 - rho0) * (x0 - m0))
            else:  # the step from t = 1: lambda = -inf, UniC of order 1
                x = base + (1 - t / t0) * 0.5 * (x0 - m0)
        if callback is not None:
            callback(dict(i=i, t=ts[i], x=x, denoised=x0))
        x0s.append(x0)
        x_start, target = x, x0
        if i > 0 and s > 0 and math.isfinite(lam[i - 1]):  # predictor: x0 extrapolated to the step's midpoint
            r = (lam[i] - lam[i - 1]) / (_log_snr(s) - lam[i])
            target = x0 + (x0 - x0s[-2]) / (2 * r)
        x = (s / t) * x + (1 - s / t) * target
    return x

def _pad_tokens(a: torch.Tensor, length: int) -> torch.Tensor:
    """Pad (B, L, ...) with zeros (or False) along L to length."""
    pad = length - a.shape[1]
    if pad == 0:
        return a
    return torch.cat([a, a.new_zeros(a.shape[0], pad, *a.shape[2:])], dim=1)


def _expand(v: torch.Tensor, B: int) -> torch.Tensor:
    return v.expand(B, *v.shape[1:]) if v.shape[0] == 1 and B > 1 else v


def _cat_cond(cond: dict, uncond: dict, B: int) -> dict:
    """One doubled-batch condition from cond and uncond: [cond; uncond], text padded to a common length."""
    if set(cond) != set(uncond):
        raise ValueError(f"cfg_model: cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    cond, uncond = dict(cond), dict(uncond)
    if "context" in cond:  # a missing mask means every token is real
        for c in (cond, uncond):
            if c["context"] is not None and c.get("context_mask") is None:
                c["context_mask"] = torch.ones(c["context"].shape[:2], dtype=torch.bool, device=c["context"].device)
        L = max(cond["context"].shape[1], uncond["context"].shape[1])
        for c in (cond, uncond):
            c["context"], c["context_mask"] = _pad_tokens(c["context"], L), _pad_tokens(c["context_mask"], L)
    out = {}
    for key in cond:
        a, b = cond[key], uncond[key]
        if a is None and b is None:
            out[key] = None
        elif a is None or b is None:
            raise ValueError(f"cfg_model: {key!r} is None on one side only; pass both, or use batched=False")
        else:
            out[key] = torch.cat([_expand(a, B), _expand(b, B)], dim=0)
    return out


def cfg_model(model: Callable, guidance: float, cond: dict, uncond: dict, batched: bool = True) -> Callable:
    """Classifier-free guidance: a velocity callable v_uncond + guidance * (v_cond - v_uncond).

    batched=True runs cond and uncond as one doubled batch (contexts of different lengths are padded with
    zeros and mask False); batched=False makes two calls (half the peak memory). guidance == 1 is the plain
    conditional call. Condition tensors with batch 1 are broadcast to the batch of x.
    """
    if guidance == 1:
        return lambda x, t: model(x, t, **cond)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        if batched:
            v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), **_cat_cond(cond, uncond, B)).chunk(2)
        else:
            v_cond = model(x, t, **{k: _expand(v, B) if torch.is_tensor(v) else v for k, v in cond.items()})
            v_uncond = model(x, t, **{k: _expand(v, B) if torch.is_tensor(v) else v for k, v in uncond.items()})
        return v_uncond + guidance * (v_cond - v_uncond)

    return guided


# ---- diffusers' grids and solvers over the same velocity callable (released models) ----------------------------
def flow_match_sigmas(steps: int, shift: float = 1.0, *, base: torch.Tensor | None = None,
                      shift_terminal: float | None = None, shifted_min: bool = True,
                      train_steps: int = 1000) -> torch.Tensor:
    """The sigma grid (steps + 1,) of diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps), 0 last.

    The unshifted grid `base` (steps,) defaults to linspace(1, sigma_min, steps), where sigma_min is the
    scheduler's smallest training sigma 1/train_steps, already shifted at construction unless the scheduler
    shifts dynamically (shifted_min=False); set_timesteps then shifts the whole grid, so sigma_min is shifted
    twice (checked against diffusers 0.42). A dynamic ("exponential") shift by mu is shift = exp(mu): both are
    shift_t. shift_terminal stretches the grid so that its last non-zero sigma is that value (LTX-Video 0.9.1).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if base is None:
        lowest = torch.tensor(1.0 / train_steps, dtype=torch.float32)  # the scheduler's float32 training sigmas
        lowest = float(shift_t(lowest, shift)) if shifted_min else float(lowest)
        base = torch.linspace(1.0, lowest, steps, dtype=torch.float64)
    elif len(base) != steps:
        raise ValueError(f"base must hold {steps} sigmas (one per step), got {len(base)}")
    sigmas = shift_t(torch.as_tensor(base, dtype=torch.float64), shift)  # (steps,)
    if shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    return torch.cat([sigmas.float(), torch.zeros(1)])  # (steps + 1,)


def flow_unipc(shift: float = 1.0, order: int = 2, **options):
    """diffusers' UniPC multistep solver in its flow-matching form (Wan's default sampler) for sample_scheduler.

    use_flow_sigmas with prediction_type "flow_prediction" makes it integrate the same v = noise - x0, on the
    grid shift_t(linspace(1, 1/1000, steps + 1)[:-1], shift) then 0; it works for any velocity model, minisora's
    VideoDiT included. Sigmas handed to sample_scheduler are shifted by `shift` again: pass unshifted ones.
    """
    from minisora.models.diffusers_vae import require_diffusers

    return require_diffusers().UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=order, **options
    )


@torch.no_grad()
def sample_scheduler(model: Callable, x: torch.Tensor, scheduler, steps: int, *, sigmas: list[float] | None = None,
                     mu: float | None = None, callback: Callable | None = None, **cond) -> torch.Tensor:
    """Integrate dx/dt = model(x, t) with a diffusers flow-matching scheduler's own update rule (UniPC, Euler, ...).

    The scheduler sets the grid (set_timesteps(steps), or from `sigmas` (steps,) without the final 0, and `mu`
    for a dynamic shift, as LTXPipeline passes them) and does every step; the model sees
    t = timestep / num_train_timesteps, the value a diffusers pipeline gives its transformer (UniPC rounds
    its timesteps to integers while stepping with exact sigmas, as Wan's pipeline does). `scheduler` is
    reset here, so one object can serve many calls, but not two at once.
    """
    kwargs = {k: v for k, v in (("sigmas", sigmas), ("mu", mu)) if v is not None}
    scheduler.set_timesteps(None if sigmas is not None else steps, device=x.device, **kwargs)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # what WanPipeline does: no search for the timestep in the grid
    B, train_steps = x.shape[0], scheduler.config.num_train_timesteps
    for i, timestep in enumerate(scheduler.timesteps):
        t = (timestep.double() / train_steps).float().to(x.device)  # 0-dim
        v = model(x, t.expand(B), **cond)  # (B, ...)
        if callback is not None:
            callback(dict(i=i, t=t, x=x, denoised=x - t * v))
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
    return x


def check_sampling(steps: int, guidance: float, sampler: str, samplers: Sequence[str]) -> None:
    """The sampling arguments every pipeline takes: steps an int >= 1, guidance >= 1, a sampler it has."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if guidance < 1:
        raise ValueError(f"guidance (cfg scale) must be >= 1 (1 = no guidance), got {guidance}")
    if sampler not in samplers:
        raise ValueError(f"sampler must be one of {', '.join(samplers)}, got {sampler!r}")


def check_shift(shift: float | None) -> float | None:
    """A sampling grid's shift as a float (None stays None); it must be a number > 0."""
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0):
        raise ValueError(f"shift (the sampling grid's timestep shift) must be a number > 0, got {shift!r}")
    return None if shift is None else float(shift)
