"""Imitates ``modules/sd_samplers.py`` (A1111 v1.10.1): ``all_samplers`` = the k-diffusion, timestep and LCM
samplers' ``SamplerData`` (``sd_samplers_kdiffusion.samplers_data_k_diffusion``,
``sd_samplers_timesteps.samplers_data_timesteps``, ``sd_samplers_lcm.samplers_data_lcm``: each constructor builds
its module's sampler class); ``find_sampler_config(name)``; ``create_sampler(name, model)`` builds the sampler with
its config's constructor and sets ``sampler.config``. (The double's constructors find the sampler classes when they
are called, so a Forge double's classes are the ones built.)"""

from modules import sd_samplers_common, sd_samplers_kdiffusion, sd_samplers_lcm, sd_samplers_timesteps


def _data(samplers, module, class_name):
    return [sd_samplers_common.SamplerData(label, lambda model, f=funcname: getattr(module, class_name)(f, model),
                                           aliases, options)
            for label, funcname, aliases, options in samplers]


all_samplers = [
    *_data(sd_samplers_kdiffusion.samplers_k_diffusion, sd_samplers_kdiffusion, "KDiffusionSampler"),
    *_data(sd_samplers_timesteps.samplers_timesteps, sd_samplers_timesteps, "CompVisSampler"),
    *_data(sd_samplers_lcm.samplers_lcm, sd_samplers_lcm, "LCMSampler"),
]
all_samplers_map = {x.name: x for x in all_samplers}


def find_sampler_config(name):
    if name is not None:
        return all_samplers_map.get(name)
    return all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
