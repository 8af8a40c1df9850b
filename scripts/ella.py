"""ELLA for AUTOMATIC1111 / Forge: the host's entry point. It registers the script and the callbacks; the work is
in ``ella_ext.webui``."""

from modules import script_callbacks, scripts

from ella_ext.webui import a1111, api, forge, generation, host, settings, ui, xyz

# The host is detected once: A1111 1.10, Forge classic or Forge new. Only the timestep of a row and the memory
# bookkeeping differ; everything else is shared.
ADAPTER = a1111 if host.kind() == host.A1111 else forge


class ELLAScript(scripts.Script):
    sorting_priority = 15  # Forge orders its always-visible scripts by this

    def title(self):
        return "ELLA"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return ui.build(self, is_img2img)

    def process(self, p, *args):
        generation.start(p, args)

    def process_batch(self, p, *args, **kwargs):
        generation.prepare_batch(p, kwargs.get("batch_number", 0))

    def process_before_every_sampling(self, p, *args, **kwargs):
        generation.watch_sampler(p)
        ADAPTER.before_sampling(p, generation.sampling_memory(p))

    def postprocess_batch(self, p, *args, **kwargs):
        generation.finish_batch(p)

    def postprocess(self, p, processed, *args):
        generation.finish(p)


def on_cfg_denoiser(params):
    generation.on_denoiser(params, ADAPTER)


# Registered once, when the host loads this file (it clears all callbacks before loading scripts again), and
# positionally: Forge classic's on_X(callback) has no name= keyword.
script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
script_callbacks.on_ui_settings(settings.on_ui_settings)
script_callbacks.on_app_started(api.on_app_started)
script_callbacks.on_before_ui(xyz.add_axes)
script_callbacks.on_infotext_pasted(ui.on_infotext_pasted)
