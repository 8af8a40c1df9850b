"""Imitates ``modules/sd_samplers_timesteps_impl.py`` (A1111 v1.10.1; Forge alike) as far as the model calls go:

- ``ddim``: for ``index`` from the last timestep down to 1, one call at ``timesteps[index].item() * s_in``, with
  ``k_diffusion.sampling.torch.randn_like`` noise (times eta's sigma, 0 by default) each step;
- ``plms``: the same steps, and at the first one a second call at the next timestep (the pseudo improved Euler
  warm-up before the linear multistep);
- ``unipc``: ``UniPCCFG`` over ``NoiseScheduleVP('discrete')`` (``total_N`` = 1000, ``T`` = 1), multistep with the
  defaults (``uni_pc_order`` 3, ``uni_pc_skip_type`` time_uniform, lower order final, corrector on all but the last
  step): continuous times ``linspace(t_T, 1 / 1000, steps + 1)`` (``t_T`` = 1, or in img2img
  ``timesteps[-1] / 1000 + 1 / 1000``), the model called once at each of the first ``steps`` of them with
  ``t_input = (t - 1 / total_N) * 1000.`` (fractional timesteps).
The double returns the latent unchanged (no UNet behind it), so only the calls are imitated.
"""

import k_diffusion.sampling
import torch

from modules import shared


@torch.no_grad()
def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        x = x + 0 * e_t + 0 * k_diffusion.sampling.torch.randn_like(x)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x})
    return x


@torch.no_grad()
def plms(model, x, timesteps, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = model(x, ts, **extra_args)
        if i == 0:
            model(x + 0 * e_t, t_next, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x})
    return x


@torch.no_grad()
def unipc(model, x, timesteps, extra_args=None, callback=None, disable=None, is_img2img=False):
    extra_args = {} if extra_args is None else extra_args
    total_n, order, steps = 1000, shared.opts.uni_pc_order, len(timesteps)
    assert steps >= order, "UniPC order must be < sampling steps"
    t_start = timesteps[-1] / 1000 + 1 / 1000 if is_img2img else None
    t_T = 1.0 if t_start is None else t_start
    times = torch.linspace(t_T, 1.0 / total_n, steps + 1).to(x.device)
    for step in range(steps):
        vec_t = times[step].expand(x.shape[0])
        model(x, (vec_t - 1.0 / total_n) * 1000.0, **extra_args)
        if step > 0 and callback is not None:
            callback({"x": x, "i": step - 1, "sigma": 0, "sigma_hat": 0, "denoised": x})
    if callback is not None:
        callback({"x": x, "i": steps - 1, "sigma": 0, "sigma_hat": 0, "denoised": x})
    return x
