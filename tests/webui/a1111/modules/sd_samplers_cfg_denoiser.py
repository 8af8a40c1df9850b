"""Imitates ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward`` (A1111 v1.10.1) up to the inner model:

- ``sd_samplers_common.apply_refiner(self, sigma)`` first: after a refiner switch the sampler's new conds are used;
- ``reconstruct_multicond_batch(cond, self.step)``: one row per AND sub-prompt, image by image (rows of unequal token
  counts padded by repeating the last token, ``prompt_parser.py``); ``reconstruct_cond_batch(uncond, self.step)``;
- ``x_in`` / ``sigma_in``: each image repeated once per sub-prompt, then the uncond copies of all images;
- ``CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond,
  self)`` through ``cfg_denoiser_callback``, then every field read back;
- the batched path only when cond and uncond have the same token count, else cond and uncond run separately;
- ``self.step += 1`` per call.
Instead of a UNet, the double records what the inner model would get and returns ``x`` unchanged.
"""

import torch

from modules import prompt_parser
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback


class State:  # host: modules/shared_state.py
    sampling_step = 0
    sampling_steps = 0


state = State()


def _stack_rows(rows):
    """Rows (tensors ``[T, C]`` or SDXL dicts) -> one batch, padding token counts by repeating the last token."""
    if isinstance(rows[0], dict):
        crossattn = _stack_rows([r["crossattn"] for r in rows])
        return prompt_parser.DictWithShape({"crossattn": crossattn, "vector": torch.stack([r["vector"] for r in rows])})
    longest = max(r.shape[0] for r in rows)
    padded = [torch.cat([r, r[-1:].repeat(longest - r.shape[0], 1)]) if r.shape[0] < longest else r for r in rows]
    return torch.stack(padded)


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([x[key] for x in conds]) for key in conds[0]}


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.model_wrap = None
        self.step = 0
        self.steps = None
        self.total_steps = None
        self.p = None
        self.inner_calls = []  # (x_in, sigma_in, cond_in or (cond, uncond), batched)

    @property
    def inner_model(self):
        raise NotImplementedError()

    def update_inner_model(self):
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        from modules import sd_samplers_common  # it imports this module's state

        if sd_samplers_common.apply_refiner(self, sigma):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]
        # cond: per image, a list of (rows at each step: the double keeps one row per sub-prompt, fixed over steps)
        conds_list = []
        rows = []
        for image_rows in cond:
            conds_list.append([(len(rows) + j, 1.0) for j in range(len(image_rows))])
            rows.extend(image_rows)
        tensor = _stack_rows(rows)
        uncond = _stack_rows(uncond)
        repeats = [len(c) for c in conds_list]
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)]
                                  + [image_cond])
        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor,
                                   uncond, self)
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        if tensor.shape[1] == uncond.shape[1]:
            self.inner_calls.append((x_in, sigma_in, catenate_conds([tensor, uncond]), True))
        else:
            self.inner_calls.append((x_in, sigma_in, (tensor, uncond), False))
        self.step += 1
        return x
