"""Imitates ``modules/sd_samplers.py`` + ``modules/sd_samplers_common.py`` (A1111 v1.10.1): ``find_sampler_config``
and ``SamplerData.total_steps`` (doubled for samplers whose options say ``second_order``)."""

from dataclasses import dataclass, field


# double-simplified: the host's is a namedtuple (name, constructor, aliases, options); the double builds a sampler
# from its family instead of calling a constructor, and needs no aliases
@dataclass
class SamplerData:
    name: str
    family: str  # double-only: "k-diffusion" or "timesteps", which sampler class create_sampler builds
    options: dict = field(default_factory=dict)

    def total_steps(self, steps):
        if self.options.get("second_order", False):
            steps = steps * 2
        return steps


# a few of the host's samplers (sd_samplers_kdiffusion.samplers_k_diffusion, sd_samplers_timesteps.samplers_timesteps)
all_samplers = [
    SamplerData("Euler", "k-diffusion"),
    SamplerData("Euler a", "k-diffusion", {"uses_ensd": True}),
    SamplerData("Heun", "k-diffusion", {"second_order": True}),
    SamplerData("DPM2", "k-diffusion", {"discard_next_to_last_sigma": True, "second_order": True}),
    SamplerData("DDIM", "timesteps"),
    SamplerData("PLMS", "timesteps"),
    SamplerData("UniPC", "timesteps"),
]
all_samplers_map = {x.name: x for x in all_samplers}


def find_sampler_config(name):
    if name is not None:
        return all_samplers_map.get(name)
    return all_samplers[0]
