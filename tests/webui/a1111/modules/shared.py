"""Imitates ``modules/shared.py`` + ``modules/options.py`` (A1111 v1.10.1): ``opts`` returns a registered option's
default until set; ``opts.set`` (what ``process_images`` applies ``override_settings`` with) changes a registered
option; ``opts.cast_value`` casts text to the type of the option's default; ``OptionInfo(..., infotext=...)`` names the
info-text key that pasting turns into a settings override; ``cmd_opts`` holds the command-line flags; ``state`` the
job's interrupt/skip flags; ``sd_model`` is the loaded checkpoint."""

from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.section = section
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self


class Options:
    def __init__(self):  # double-simplified: no option labels or restricted options to start from
        super().__setattr__("data", {})
        super().__setattr__("data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data:
            self.data[key] = info.default

    def __setattr__(self, key, value):
        self.data[key] = value

    def set(self, key, value, is_api=False, run_callbacks=True):
        """True if the option changed; an unregistered key raises KeyError (``self.data_labels[key]``)."""
        if self.data.get(key, None) == value:
            return False
        option = self.data_labels[key]
        if is_api and option.restrict_api:
            return False
        setattr(self, key, value)
        return True

    def cast_value(self, key, value):
        if value is None:
            return None
        default = self.data_labels[key].default
        if default is None:
            default = getattr(self, key, None)
        if default is None:
            return None
        kind = type(default)
        return False if kind is bool and value == "False" else kind(value)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)


opts = Options()
# the host options the tests rely on, at their defaults (modules/shared_options.py)
opts.data.update(use_old_scheduling=False, enable_quantization=False, skip_early_cond=0.0, pad_cond_uncond=False,
                 pad_cond_uncond_v0=False, batch_cond_uncond=True, img2img_fix_steps=False, eta_ancestral=1.0,
                 eta_ddim=0.0, uni_pc_order=3, refiner_switch_by_sample_steps=False)

# modules/cmd_args.py: --api-auth "user:password[,user2:password2]" (None when not given)
cmd_opts = SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=False, api_auth=None)
class State:  # host: modules/shared_state.py
    """modules/shared_state.py State: Interrupt / Skip set ``interrupted`` / ``skipped``; ``begin(job)`` (which
    clears them) and ``end()`` frame every job: modules/call_queue.py wrap_gradio_gpu_call for the UI,
    modules/api/api.py text2imgapi / img2imgapi for the API."""

    def __init__(self):
        self.interrupted = self.skipped = False
        self.job = ""
        self.time_start = None
        self._jobs = 0

    def begin(self, job="(unknown)"):
        self._jobs += 1
        self.time_start = float(self._jobs)  # time.time() in the host: distinct per job
        self.skipped = self.interrupted = False
        self.job = job

    def end(self):
        self.job = ""


state = State()
sd_model = None
