// ELLA UI trial in a running Forge "new" (gradio 4.40), through headless Chromium with playwright-core (not part of
// CI: it needs a WebUI with the tiny-sd15 / tiny-t5 models in models/ELLA and the LoRA "testlora" in models/Lora).
// (a) txt2img with ELLA + LoRA + hires fix through the UI, (b) Send to img2img restores ELLA, then img2img, (d) the
// paste button restores every ELLA control; console errors are collected.
// Usage: npm install playwright-core; URL=http://127.0.0.1:7870 OUT=/tmp/ui CHROMIUM=/usr/bin/chromium \
//        node tools/ui_trial_forge.js [--load-only | --host-flow]
//   --load-only: load the page and collect console errors (to compare with a run without the extension)
//   --host-flow: the same clicks without touching the ELLA controls
const { chromium } = require('playwright-core');
const fs = require('fs');
const os = require('os');
const path = require('path');
const OUT = process.env.OUT || os.tmpdir();
const URL = process.env.URL || 'http://127.0.0.1:7870';
const LOAD_ONLY = process.argv.includes('--load-only');
const HOST_FLOW = process.argv.includes('--host-flow'); // no ELLA controls: txt2img, Send to img2img, img2img, paste
const log = (...a) => console.log(new Date().toISOString().slice(11, 19), ...a);
const results = [];
const rec = (step, ok, detail) => { results.push({ step, ok, detail }); log(ok ? 'PASS' : 'FAIL', step, JSON.stringify(detail)); };

function exactRe(value) { return new RegExp('^\\s*(✓\\s*)?' + value.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '\\s*$'); }

async function pickDropdown(page, id, value) {
  const input = page.locator(`#${id} input`).first();
  await input.click();
  let opt = page.locator(`#${id} ul.options li`).filter({ hasText: exactRe(value) }).first();
  if (!(await opt.count())) opt = page.locator('ul.options li').filter({ hasText: exactRe(value) }).first();
  await opt.waitFor({ timeout: 5000 });
  await opt.click();
  await page.waitForTimeout(400);
  return await input.inputValue();
}
async function setNumber(page, sel, val) {
  const inp = page.locator(sel).first();
  await inp.fill(String(val));
  await inp.press('Enter');
  await inp.blur();
  await page.waitForTimeout(150);
  return await inp.inputValue();
}
async function setRadio(page, id, value) {
  await page.locator(`#${id} label`).filter({ hasText: exactRe(value) }).first().click();
  await page.waitForTimeout(200);
}
async function waitInfo(page, tab, prevText, timeoutMs) {
  const t0 = Date.now();
  while (Date.now() - t0 < timeoutMs) {
    const txt = await page.locator(`#html_info_${tab}`).first().innerText().catch(() => '');
    const busy = await page.locator(`#${tab}_interrupt`).first().isVisible().catch(() => false);
    if (txt.trim() && txt !== prevText && !busy) return { txt, secs: (Date.now() - t0) / 1000 };
    await page.waitForTimeout(1000);
  }
  return { txt: await page.locator(`#html_info_${tab}`).first().innerText().catch(() => ''), timeout: true };
}
async function ellaState(page, tab) {
  const g = async (f) => { try { return await f(); } catch (e) { return 'err:' + e.message.split('\n')[0]; } };
  return {
    enabled: await g(() => page.locator(`#ella_${tab}_accordion-checkbox input`).first().isChecked()),
    visibleCb: await g(() => page.locator(`#ella_${tab}_accordion-visible-checkbox`).first().isChecked()),
    connector: await g(() => page.locator(`#ella_${tab}_connector input`).first().inputValue()),
    text_encoder: await g(() => page.locator(`#ella_${tab}_text_encoder input`).first().inputValue()),
    token_length: await g(() => page.locator(`#ella_${tab}_token_length input:checked`).first().inputValue()),
    max_length: await g(() => page.locator(`#ella_${tab}_max_length input[type=number]`).first().inputValue()),
    clip_mode: await g(() => page.locator(`#ella_${tab}_clip_mode input:checked`).first().inputValue()),
    negative: await g(() => page.locator(`#ella_${tab}_negative input:checked`).first().inputValue()),
    llm_prompt: await g(() => page.locator(`#ella_${tab}_llm_prompt textarea`).first().inputValue()),
    hires: await g(() => page.locator(`#ella_${tab}_hires input`).first().isChecked()),
  };
}

(async () => {
  const udd = fs.mkdtempSync(path.join(os.tmpdir(), 'ella-ui-profile-'));
  const ctx = await chromium.launchPersistentContext(udd, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1400, height: 1800 },
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  const consoleErrs = [];
  page.on('console', m => { if (m.type() === 'error' || m.type() === 'warning') consoleErrs.push(`[${m.type()}] ${m.text()} @ ${(m.location() || {}).url || ''}:${(m.location() || {}).lineNumber || ''}`); });
  page.on('pageerror', e => consoleErrs.push(`[pageerror] ${e.message}`));
  page.on('requestfailed', r => consoleErrs.push(`[requestfailed] ${r.url()} ${r.failure() && r.failure().errorText}`));
  page.on('response', r => { if (r.status() >= 400) consoleErrs.push(`[http ${r.status()}] ${r.request().method()} ${r.url()}`); });
  try {
    await page.goto(URL, { waitUntil: 'domcontentloaded', timeout: 60000 });
    await page.locator('#txt2img_prompt textarea').waitFor({ timeout: 120000 });
    await page.waitForTimeout(4000);
    rec('ui loaded', true, await page.title());
    if (LOAD_ONLY) {
      rec('ELLA accordion present', (await page.locator('#ella_txt2img_accordion').count()) > 0, await page.locator('#ella_txt2img_accordion').count());
      return;
    }

    if (HOST_FLOW) {
      const ta = page.locator('#txt2img_prompt textarea');
      await ta.fill('a red cube on a blue sphere <lora:testlora:1>');
      await setNumber(page, '#txt2img_steps input[type=number]', 3);
      await setNumber(page, '#txt2img_width input[type=number]', 64);
      await setNumber(page, '#txt2img_height input[type=number]', 64);
      const r = await waitInfo(page, 'txt2img', '', 1).then(async () => { await page.locator('#txt2img_generate').click(); await page.waitForTimeout(2000); return waitInfo(page, 'txt2img', '', 240000); });
      rec('host txt2img', !r.timeout, r);
      await page.locator('#txt2img_send_to_img2img').click(); await page.waitForTimeout(4000);
      await page.locator('#img2img_generate').click(); await page.waitForTimeout(2000);
      const r2 = await waitInfo(page, 'img2img', '', 240000);
      rec('host img2img', !r2.timeout, r2);
      await page.locator('#tab_txt2img-button').click(); await page.waitForTimeout(1000);
      await ta.fill(r.txt); await page.locator('#tab_txt2img #paste').first().click(); await page.waitForTimeout(3000);
      rec('host paste', true, await ta.inputValue());
      return;
    }
    // ---------- (a) txt2img ----------
    rec('ELLA defaults before', true, await ellaState(page, 'txt2img'));
    await page.locator('#ella_txt2img_accordion .label-wrap').first().click();
    await page.waitForTimeout(800);
    const st0 = await ellaState(page, 'txt2img');
    rec('ELLA accordion enabled (clicking its header)', st0.enabled === true && st0.visibleCb === true, st0);

    let v;
    try { v = await pickDropdown(page, 'ella_txt2img_connector', 'tiny-sd15'); rec('connector tiny-sd15', v === 'tiny-sd15', v); } catch (e) { rec('connector tiny-sd15', false, e.message); }
    try { v = await pickDropdown(page, 'ella_txt2img_text_encoder', 'tiny-t5'); rec('text encoder tiny-t5', v === 'tiny-t5', v); } catch (e) { rec('text encoder tiny-t5', false, e.message); }

    const prompt = 'a red cube on a blue sphere <lora:testlora:1>';
    const ta = page.locator('#txt2img_prompt textarea');
    await ta.click();
    await ta.fill('');
    await ta.pressSequentially(prompt, { delay: 5 });
    await page.waitForTimeout(2000);
    rec('prompt typed', (await ta.inputValue()) === prompt, await ta.inputValue());
    const tc = page.locator('#ella_txt2img_token_counter');
    const tcInfo = { count: await tc.count(), text: (await tc.count()) ? await tc.first().innerText() : null,
      visible: (await tc.count()) ? await tc.first().isVisible() : false, title: (await tc.count()) ? await tc.first().getAttribute('title') : null,
      host_counter: await page.locator('#txt2img_token_counter').innerText().catch(() => null) };
    rec('ELLA token counter after typing', !!(tcInfo.text && /ELLA \d+/.test(tcInfo.text) && tcInfo.visible), tcInfo);

    try { v = await pickDropdown(page, 'txt2img_sampling', 'Euler'); rec('sampler Euler', v === 'Euler', v); } catch (e) { rec('sampler Euler', false, e.message); }
    try {
      const s = await setNumber(page, '#txt2img_steps input[type=number]', 3);
      const w = await setNumber(page, '#txt2img_width input[type=number]', 64);
      const h = await setNumber(page, '#txt2img_height input[type=number]', 64);
      rec('steps/size', s === '3' && w === '64' && h === '64', { s, w, h });
    } catch (e) { rec('steps/size', false, e.message); }

    // Hires. fix (InputAccordion: opening it enables it)
    await page.locator('#txt2img_hr .label-wrap').first().click();
    await page.waitForTimeout(800);
    const hrOn = await page.locator('#txt2img_hr-checkbox input').first().isChecked().catch(e => 'err:' + e.message);
    let hrDetail = { hrOn };
    try {
      hrDetail.upscaler = await pickDropdown(page, 'txt2img_hr_upscaler', 'Latent');
      hrDetail.scale = await setNumber(page, '#txt2img_hr_scale input[type=number]', 1.5);
      hrDetail.steps = await setNumber(page, '#txt2img_hires_steps input[type=number]', 2);
      hrDetail.denoise = await setNumber(page, '#txt2img_denoising_strength input[type=number]', 0.5);
      hrDetail.finalres = await page.locator('#txtimg_hr_finalres').innerText().catch(() => null);
    } catch (e) { hrDetail.error = e.message; }
    rec('hires fix set', hrOn === true && hrDetail.upscaler === 'Latent' && hrDetail.scale === '1.5' && hrDetail.steps === '2' && hrDetail.denoise === '0.5', hrDetail);
    rec('ELLA state before generate', true, await ellaState(page, 'txt2img'));

    const prev = await page.locator('#html_info_txt2img').first().innerText().catch(() => '');
    await page.locator('#txt2img_generate').click();
    log('txt2img generate clicked');
    await page.waitForTimeout(2000);
    const r = await waitInfo(page, 'txt2img', prev, 240000);
    const gi = r.txt;
    const need = ['ELLA: tiny-sd15', 'ELLA LLM: tiny-t5', 'Lora hashes', 'Hires upscale'];
    const missing = need.filter(k => !gi.includes(k));
    rec('txt2img generation info text', !r.timeout && missing.length === 0 && !gi.includes('ELLA error'), { secs: r.secs, timeout: !!r.timeout, missing, info: gi });
    await page.screenshot({ path: path.join(OUT, 'forge_txt2img.png'), fullPage: false });
    const infoA = gi;

    // ---------- (b) Send to img2img ----------
    const sendBtn = page.locator('#txt2img_send_to_img2img');
    log('send btn count', await sendBtn.count());
    await sendBtn.click();
    await page.waitForTimeout(4000);
    const i2iTabVisible = await page.locator('#tab_img2img').isVisible().catch(() => null);
    if (!i2iTabVisible) { await page.locator('#tab_img2img-button').click(); await page.waitForTimeout(1500); }
    const i2i = await ellaState(page, 'img2img');
    const i2iPrompt = await page.locator('#img2img_prompt textarea').inputValue().catch(e => 'err:' + e.message);
    const i2iSteps = await page.locator('#img2img_steps input[type=number]').inputValue().catch(e => 'err:' + e.message);
    const i2iImgs = await page.locator('#tab_img2img img').count().catch(() => 0);
    rec('send to img2img restores ELLA', i2i.enabled === true && i2i.connector === 'tiny-sd15' && i2i.text_encoder === 'tiny-t5',
      { autoSwitched: i2iTabVisible, ...i2i, i2iPrompt, i2iSteps, imgsInTab: i2iImgs });
    await page.waitForTimeout(1000);
    const tc2 = page.locator('#ella_img2img_token_counter');
    rec('img2img token counter', (await tc2.count()) > 0 && /ELLA/.test(await tc2.first().innerText()), (await tc2.count()) ? await tc2.first().innerText() : null);

    const prev2 = await page.locator('#html_info_img2img').first().innerText().catch(() => '');
    await page.locator('#img2img_generate').click();
    log('img2img generate clicked');
    await page.waitForTimeout(2000);
    const r2 = await waitInfo(page, 'img2img', prev2, 240000);
    rec('img2img generation info text', !r2.timeout && /ELLA: tiny-sd15/.test(r2.txt) && /ELLA LLM: tiny-t5/.test(r2.txt) && !/ELLA error/.test(r2.txt),
      { secs: r2.secs, timeout: !!r2.timeout, info: r2.txt });
    await page.screenshot({ path: path.join(OUT, 'forge_img2img.png'), fullPage: false });

    // ---------- (d) paste (↙) into txt2img ----------
    await page.locator('#tab_txt2img-button').click();
    await page.waitForTimeout(1000);
    // move the ELLA controls away from (a)'s values first
    await page.locator('#ella_txt2img_accordion-visible-checkbox').click();
    await setRadio(page, 'ella_txt2img_token_length', 'Fixed');
    await setRadio(page, 'ella_txt2img_clip_mode', 'ELLA + CLIP');
    await setRadio(page, 'ella_txt2img_negative', 'Empty');
    await page.locator('#ella_txt2img_llm_prompt textarea').fill('something else');
    await page.locator('#ella_txt2img_hires input').first().uncheck();
    await page.waitForTimeout(500);
    rec('ELLA state changed before paste', true, await ellaState(page, 'txt2img'));
    const pasteAndRead = async (text) => {
      await ta.fill(text);
      await page.waitForTimeout(300);
      await page.locator('#tab_txt2img #paste').first().click();
      await page.waitForTimeout(3000);
      return { ...(await ellaState(page, 'txt2img')), prompt: await ta.inputValue(),
        steps: await page.locator('#txt2img_steps input[type=number]').inputValue(),
        hr: await page.locator('#txt2img_hr-checkbox input').first().isChecked().catch(() => null) };
    };
    const p1 = await pasteAndRead(infoA);
    rec('paste (a) info text restores ELLA', p1.enabled === true && p1.connector === 'tiny-sd15' && p1.text_encoder === 'tiny-t5' &&
      p1.token_length === 'Flexible' && p1.clip_mode === 'ELLA only' && p1.negative === 'LLM' && p1.llm_prompt === '' && p1.hires === true, p1);
    const crafted = 'a cat\nNegative prompt: ugly\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, ELLA: tiny-sd15, ELLA LLM: tiny-t5, ' +
      'ELLA tokens: fixed 77, ELLA mode: ELLA + CLIP, ELLA negative: Empty, ELLA prompt: a cat in a hat, ELLA hires: off';
    const p2 = await pasteAndRead(crafted);
    rec('paste crafted non-default info text', p2.enabled === true && p2.token_length === 'Fixed' && p2.max_length === '77' &&
      p2.clip_mode === 'ELLA + CLIP' && p2.negative === 'Empty' && p2.llm_prompt === 'a cat in a hat' && p2.hires === false, p2);
    const p3 = await pasteAndRead('a dog\nSteps: 5, Sampler: Euler, CFG scale: 6, Seed: 3, Size: 64x64');
    rec('paste info text without ELLA disables ELLA', p3.enabled === false, p3);
    await page.screenshot({ path: path.join(OUT, 'forge_paste.png'), fullPage: false });
  } catch (e) {
    rec('script exception', false, e.stack);
    await page.screenshot({ path: path.join(OUT, 'forge_error.png') }).catch(() => {});
  } finally {
    console.log('=== CONSOLE ERRORS/WARNINGS (' + consoleErrs.length + ') ===');
    for (const c of consoleErrs) console.log(c);
    console.log('=== SUMMARY ===');
    for (const r of results) console.log((r.ok ? 'PASS ' : 'FAIL ') + r.step);
    await ctx.close();
  }
})();
