"""Imitates ``modules/sd_samplers_extra.py`` ``restart_sampler`` (A1111 v1.10.1; Forge alike) as far as its model
calls go: from 20 steps on, the schedule is remade as Karras sigmas over ``steps - restart_steps * restart_times``
steps between its last non-zero sigma and its first, and at the sigma nearest 0.1 a restart segment (Karras, from
that sigma up to the one nearest 2, ``restart_steps`` steps) is appended ``restart_times`` times (9 steps once; from
36 steps, ``steps // 4`` twice); every (old, new) pair is a Heun step (the model at ``old``, and at ``new`` unless it
is 0), with ``k_diffusion.sampling.torch.randn_like`` noise added when a segment goes back up."""

import k_diffusion.sampling
import torch


@torch.no_grad()
def restart_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1., restart_list=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    karras = k_diffusion.sampling.get_sigmas_karras
    steps = sigmas.shape[0] - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item(),
                            device=sigmas.device)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    at = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            restart_steps, restart_times, restart_max = at[i + 1]
            low, high = i + 1, int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if high < low:
                segment = karras(restart_steps, sigmas[low].item(), sigmas[high].item(), device=sigmas.device)[:-1]
                pairs += list(zip(segment[:-1], segment[1:])) * restart_times
    last = None
    for step, (old, new) in enumerate(pairs):
        if last is not None and last < old:
            x = x + k_diffusion.sampling.torch.randn_like(x) * s_noise * (old ** 2 - last ** 2) ** 0.5
        denoised = model(x, old * s_in, **extra_args)
        d = k_diffusion.sampling.to_d(x, old, denoised)
        if callback is not None:
            callback({"x": x, "i": step, "sigma": new, "sigma_hat": old, "denoised": denoised})
        if new == 0:
            x = x + d * (new - old)
        else:
            x_2 = x + d * (new - old)
            d_2 = k_diffusion.sampling.to_d(x_2, new, model(x_2, new * s_in, **extra_args))
            x = x + (d + d_2) / 2 * (new - old)
        last = new
    return x
