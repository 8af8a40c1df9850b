"""Smoke test of the extension in a running WebUI, through its HTTP API (not part of CI: it needs a WebUI).

    python tools/webui_smoke.py [--url http://127.0.0.1:7860] [--connector NAME] [--text-encoder NAME] [--lora NAME]

Runs txt2img (ELLA off and on, named and positional arguments, hires fix, DDIM, Heun, CFG 1, a batch with AND and
prompt editing), img2img, a rejected argument, a missing connector and the token counter, and prints PASS/FAIL per
check. The WebUI must have been started with --api; the models must be in its models/ELLA folder
(``python tools/make_tiny_models.py <webui>/models`` makes the default ones, tiny-sd15 and tiny-t5), and the LoRA, if
given, in models/Lora. With --forge, requests carry the fields Forge new's API needs for hires fix
(``hr_additional_modules``, ``hr_cfg``). Exit status 1 if a check failed.
"""

import argparse
import base64
import io
import json
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--url", default="http://127.0.0.1:7860")
parser.add_argument("--connector", default="tiny-sd15")
parser.add_argument("--text-encoder", default="tiny-t5")
parser.add_argument("--lora", default="", help="a LoRA in models/Lora to check ELLA with (default: none)")
parser.add_argument("--forge", action="store_true", help="the WebUI is Forge new: send its hires fields")
cli = parser.parse_args()
URL = cli.url.rstrip("/")
ELLA = {"enabled": True, "connector": cli.connector, "text_encoder": cli.text_encoder}
LORA = f" <lora:{cli.lora}:1>" if cli.lora else ""
results = []


def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def image(resp):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(resp["images"][0]))).convert("RGB"), dtype=np.float32)


def gen(name, ella_args, path="/sdapi/v1/txt2img", **kw):
    body = {"prompt": "a red cube on a blue sphere" + LORA, "negative_prompt": "blurry", "steps": 3,
            "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler", "cfg_scale": 7, **kw}
    if ella_args is not None:
        body["alwayson_scripts"] = {"ELLA": {"args": ella_args}}
    t0 = time.time()
    status, resp = call(path, body)
    info = json.loads(resp["info"])["infotexts"][0] if status == 200 else json.dumps(resp)
    print(f"--- {name}: HTTP {status} in {time.time()-t0:.1f}s\n{info}\n")
    return status, resp, info


def check(name, ok):
    results.append((name, bool(ok)))
    print(("PASS " if ok else "FAIL ") + name)


status, models = call("/ella/v1/models")
check("GET /ella/v1/models lists the connector and the text encoder", status == 200 and cli.connector in [c["name"] for c in models["connectors"]]
      and cli.text_encoder in [e["name"] for e in models["text_encoders"]])

s0, r0, i0 = gen("Euler, ELLA off", None)
s1, r1, i1 = gen("Euler, ELLA on (named fields)", [ELLA])
check("ELLA on: info text has ELLA keys and the LoRA", s1 == 200 and f"ELLA: {cli.connector}" in i1 and f"ELLA LLM: {cli.text_encoder}" in i1 and (not LORA or "Lora hashes" in i1) and "ELLA error" not in i1)
check("ELLA on changes the image", s0 == s1 == 200 and np.abs(image(r0) - image(r1)).mean() > 0)
s2, r2, i2 = gen("Euler, ELLA on (positional)", [True, cli.connector, cli.text_encoder, "Fixed", 64, "ELLA + CLIP"])
check("positional args: fixed 64, ELLA + CLIP in the info text", s2 == 200 and "ELLA tokens: fixed 64" in i2 and "ELLA mode: ELLA + CLIP" in i2)
FORGE_HIRES = {"hr_additional_modules": ["Use same choices"], "hr_cfg": 7} if cli.forge else {}
s3, r3, i3 = gen("Euler, hires fix, ELLA on", [ELLA], enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5, hr_upscaler="Latent", **FORGE_HIRES)
check("hires fix with ELLA", s3 == 200 and "Hires upscale" in i3 and f"ELLA: {cli.connector}" in i3 and image(r3).shape[0] == 96)
s4, r4, i4 = gen("DDIM, ELLA on", [ELLA], sampler_name="DDIM")
check("DDIM with ELLA", s4 == 200 and f"ELLA: {cli.connector}" in i4 and "ELLA error" not in i4)
s5, r5, i5 = gen("Heun (second order), ELLA on", [ELLA], sampler_name="Heun")
check("Heun with ELLA", s5 == 200 and f"ELLA: {cli.connector}" in i5 and "ELLA error" not in i5)
s6, r6, i6 = gen("batch 2, AND, prompt editing", [ELLA], prompt="a [cat:dog:2] AND a red ball", batch_size=2)
check("batch 2 with AND and prompt editing", s6 == 200 and f"ELLA: {cli.connector}" in i6 and "ELLA error" not in i6)
s11, r11, i11 = gen("CFG 1 (Forge new: no uncond at all), ELLA on", [ELLA], cfg_scale=1)
check("CFG 1 with ELLA", s11 == 200 and f"ELLA: {cli.connector}" in i11 and "ELLA error" not in i11)
init = (r3 if s3 == 200 else r1 if s1 == 200 else r0)["images"][0]
s7, r7, i7 = gen("img2img, ELLA on", [ELLA], path="/sdapi/v1/img2img", init_images=[init], denoising_strength=0.5, width=96, height=96)
check("img2img with ELLA", s7 == 200 and f"ELLA: {cli.connector}" in i7 and "ELLA error" not in i7)
s8, r8, i8 = gen("bad named field", [{"enabled": True, "clip": "yes"}])
check("unknown field -> 422 with the allowed fields", s8 == 422 and "unknown field 'clip'" in json.dumps(r8))
s9, r9, i9 = gen("unlisted connector", [{**ELLA, "connector": "not-there"}])
check("unlisted connector -> 422 with the listed names", s9 == 422 and "not one of the listed models" in json.dumps(r9) and cli.connector in json.dumps(r9))
s12, r12, i12 = gen("a path as connector", [{**ELLA, "connector": "/etc/passwd"}])
check("a path as connector -> 422, the same answer", s12 == 422 and "not one of the listed models" in json.dumps(r12))
s10, r10 = call("/ella/v1/tokens", {"text": "a red cube on a blue sphere", "text_encoder": cli.text_encoder})
check("token counter endpoint", s10 == 200 and isinstance(r10.get("tokens"), int) and r10["tokens"] > 3)
print(json.dumps(r10))
# Issue 10: foreseeing a pass (the sampler's dry run) must not change the image: the same seed with the dry run off
# (each call computed at the call) gives the same picture up to rounding, unlike another seed.
for sampler in ("Euler a", "DPM++ 2M SDE", "Heun", "DDIM"):
    sa, ra, ia = gen(f"{sampler}, ELLA, foreseen", [ELLA], sampler_name=sampler)
    sb, rb, ib = gen(f"{sampler}, ELLA, not foreseen", [ELLA], sampler_name=sampler, override_settings={"ella_foresee": False})
    sc, rc, ic = gen(f"{sampler}, ELLA, another seed", [ELLA], sampler_name=sampler, seed=2)
    if sa == sb == sc == 200:
        same, other = np.abs(image(ra) - image(rb)).mean(), np.abs(image(ra) - image(rc)).mean()
        print(f"{sampler}: mean |diff| foreseen vs not {same:.3f}, vs another seed {other:.3f}")
    check(f"{sampler}: the dry run changes nothing (foreseen = not foreseen, unlike another seed)", sa == sb == sc == 200 and "ELLA error" not in ia + ib and same < 0.5 and other > 5 * max(same, 0.1))
# Issue 11: emphasis weights the connector's attention; weight 1 changes nothing; the setting off reads plain text.
e0, q0, _ = gen("emphasis: plain", [ELLA], prompt="a red cube")
e1, q1, _ = gen("emphasis: (red:1)", [ELLA], prompt="a (red:1) cube")
e2, q2, j2 = gen("emphasis: (red:1.5)", [ELLA], prompt="a (red:1.5) cube")
e3, q3, j3 = gen("emphasis: (red:1.5), setting off", [ELLA], prompt="a (red:1.5) cube", override_settings={"ella_emphasis": "off"})
if e0 == e1 == e2 == e3 == 200:
    print(f"emphasis: mean |diff| vs plain: (red:1) {np.abs(image(q0) - image(q1)).mean():.3f}, (red:1.5) {np.abs(image(q0) - image(q2)).mean():.3f}, (red:1.5) off {np.abs(image(q0) - image(q3)).mean():.3f}")
check("emphasis: (red:1) = plain, (red:1.5) differs, setting off = plain", e0 == e1 == e2 == e3 == 200 and np.abs(image(q0) - image(q1)).mean() == 0 and np.abs(image(q0) - image(q2)).mean() > 0 and np.abs(image(q0) - image(q3)).mean() == 0 and "ELLA emphasis: off" in j3)
# Issue 9 item 8: a connector whose metadata names another LLM runs, with a warning.
if "tiny-sd15-other-llm" in [c["name"] for c in models.get("connectors", [])]:
    s14, r14, i14 = gen("connector trained with another LLM", [{**ELLA, "connector": "tiny-sd15-other-llm"}])
    check("another LLM: image made, ELLA warning names it", s14 == 200 and "ELLA warning: " in i14 and "the connector tiny-sd15-other-llm was trained with the LLM some-org/other-llm" in i14 and "ELLA error" not in i14)
s13, r13 = call("/ella/v1/tokens", {"text": 5, "text_encoder": cli.text_encoder})
check("token counter: bad input -> 422 {error, detail}", s13 == 422 and r13.get("error") == "ELLAArgumentError" and "detail" in r13)
print("\nSUMMARY:", sum(ok for _, ok in results), "of", len(results), "passed")
for name, ok in results:
    print(("  PASS " if ok else "  FAIL ") + name)
sys.exit(0 if all(ok for _, ok in results) else 1)
