// ELLA token counter trial in a running WebUI (A1111 1.10.1, Forge classic or Forge new), through headless Chromium
// with playwright-core. Not part of CI: it needs a WebUI with this extension and the tiny models of
// tools/make_tiny_models.py (tiny-sd15, tiny-t5) in models/ELLA.
// It checks that the counter is a UI event (no request to /ella/v1/tokens), sits beside the host's token counter
// without covering it (also with the host's counter hidden and the prompt box resized), updates on typing, on
// Flexible/Fixed and the max, turns red past the limit, hides when ELLA is off, and follows "Send to img2img" and the
// paste button; each count is compared with POST /ella/v1/tokens, asked by this script (not the page).
// Usage: npm install playwright-core
//        URL=http://127.0.0.1:7862 OUT=/tmp/counter NAME=forge-new CHROMIUM=/usr/bin/chromium \
//        [API_AUTH=user:pw] [LOGIN=user:pw] [SETTINGS=1] [GENERATE=1] node tools/ui_trial_token_counter.js
//   API_AUTH: the host runs with --api-auth: the API cross-checks use these credentials, and the page's own
//             anonymous fetch of /ella/v1/tokens is expected to get 401
//   LOGIN: the host runs with --gradio-auth: log in through gradio's login page first
//   SETTINGS=1: also tick Settings > "Disable prompt token counters", apply, check, untick and apply again (this
//             writes the host's config.json)
//   GENERATE=1 (default): make a 1-step 64x64 txt2img image with ELLA to check "Send to img2img"
// Screenshots: OUT/NAME-<step>.png (the prompt area). Exit status 1 if any check failed.
const { chromium } = require('playwright-core');
const fs = require('fs');
const os = require('os');
const path = require('path');

const URL = (process.env.URL || 'http://127.0.0.1:7862').replace(/\/$/, '');
const OUT = process.env.OUT || os.tmpdir();
const NAME = process.env.NAME || 'webui';
const API_AUTH = process.env.API_AUTH || '';
const LOGIN = process.env.LOGIN || '';
const SETTINGS = process.env.SETTINGS === '1';
const GENERATE = process.env.GENERATE !== '0';
const ENCODER = 'tiny-t5';
const results = [];
const log = (...a) => console.log(new Date().toISOString().slice(11, 19), ...a);
const rec = (step, ok, detail) => { results.push({ step, ok }); log(ok ? 'PASS' : 'FAIL', step, JSON.stringify(detail)); };
const exactRe = (v) => new RegExp('^\\s*(✓\\s*)?' + v.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '\\s*$');

async function apiTokens(text, encoder = ENCODER) {
  const headers = { 'Content-Type': 'application/json' };
  if (API_AUTH) headers.Authorization = 'Basic ' + Buffer.from(API_AUTH).toString('base64');
  const r = await fetch(`${URL}/ella/v1/tokens`, { method: 'POST', headers, body: JSON.stringify({ text, text_encoder: encoder }) });
  return (await r.json()).tokens;
}

async function counterState(page, tab) {
  return page.evaluate((tab) => {
    const app = gradioApp();
    const ours = app.querySelector(`#ella_${tab}_token_counter`);
    const span = ours && ours.querySelector('.ella-count');
    const host = app.querySelector(`#${tab}_token_counter`);
    const prompt = app.querySelector(`#${tab}_prompt`);
    const rect = (e) => { if (!e) return null; const r = e.getBoundingClientRect(); return { l: r.left, r: r.right, t: r.top, b: r.bottom }; };
    return {
      text: span ? span.textContent : '',
      shown: !!(ours && ours.offsetParent !== null && span && span.offsetWidth > 0),
      over: !!(span && span.classList.contains('ella-over')),
      title: span ? span.getAttribute('title') : null,
      color: span ? getComputedStyle(span).color : null,
      besideHost: !!(ours && host && ours.parentElement === host.parentElement && prompt && ours.parentElement === prompt.parentElement),
      hostShown: !!(host && host.offsetWidth > 0),
      hostText: host ? host.textContent.trim() : null,
      ours: rect(span), host: rect(host && host.querySelector('span')), prompt: rect(prompt && prompt.querySelector('textarea')),
    };
  }, tab);
}

function overlap(a, b) { return !!(a && b && a.l < b.r && b.l < a.r && a.t < b.b && b.t < a.b); }

// Placement: above the prompt's top edge region, right part, not overlapping the host's counter, left of it.
function placed(s) {
  if (!s.ours || !s.prompt) return false;
  const nearTop = Math.abs(s.ours.t - s.prompt.t) < 40;
  const rightHalf = s.ours.l > (s.prompt.l + s.prompt.r) / 2;
  const clear = !s.hostShown || (!overlap(s.ours, s.host) && s.ours.r <= s.host.l);
  return s.besideHost && nearTop && rightHalf && clear;
}

async function waitCounter(page, tab, pred, ms = 30000) {
  const t0 = Date.now();
  let s;
  while (Date.now() - t0 < ms) {
    s = await counterState(page, tab);
    if (pred(s)) return { ...s, secs: (Date.now() - t0) / 1000 };
    await page.waitForTimeout(250);
  }
  return { ...s, timeout: true };
}

async function shot(page, tab, step) {
  const box = await page.evaluate((tab) => { // page coordinates, for a full-page screenshot
    const p = gradioApp().querySelector(`#${tab}_prompt`);
    const r = p.parentElement.getBoundingClientRect();
    return { x: Math.max(0, r.left - 20), y: Math.max(0, r.top + window.scrollY - 30), width: r.width + 40, height: r.height + 50 };
  }, tab);
  const file = path.join(OUT, `${NAME}-${step}.png`);
  await page.screenshot({ path: file, clip: box, fullPage: true });
  log('screenshot', file);
}

async function pickDropdown(page, id, value) {
  const input = page.locator(`#${id} input`).first();
  await input.click();
  let opt = page.locator(`#${id} ul.options li`).filter({ hasText: exactRe(value) }).first();
  if (!(await opt.count())) opt = page.locator('ul.options li').filter({ hasText: exactRe(value) }).first();
  await opt.waitFor({ timeout: 5000 });
  await opt.click();
  await page.waitForTimeout(400);
  return input.inputValue();
}
async function setNumber(page, sel, val) {
  const inp = page.locator(sel).first();
  await inp.fill(String(val));
  await inp.press('Enter');
  await inp.blur();
  await page.waitForTimeout(200);
}
async function setRadio(page, id, value) {
  await page.locator(`#${id} label`).filter({ hasText: exactRe(value) }).first().click();
  await page.waitForTimeout(200);
}
// gradio 4 gives the tab buttons ids, gradio 3 does not
async function openTab(page, name) {
  const byId = page.locator(`#tab_${name}-button`);
  if (await byId.count()) await byId.first().click();
  else await page.locator('#tabs > .tab-nav button').filter({ hasText: new RegExp(`^\\s*${name}\\s*$`, 'i') }).first().click();
  await page.waitForTimeout(1000);
}
async function typeInto(page, sel, text) {
  const ta = page.locator(sel).first();
  await ta.click();
  await ta.fill('');
  await ta.pressSequentially(text, { delay: 10 });
}

(async () => {
  fs.mkdirSync(OUT, { recursive: true });
  const udd = fs.mkdtempSync(path.join(os.tmpdir(), 'ella-counter-profile-'));
  const ctx = await chromium.launchPersistentContext(udd, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
    viewport: { width: 1400, height: 1200 },
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  const problems = [];
  const hostErrors = [];
  const tokenRequests = [];
  const events = [];
  const external = []; // the host's requests for resources off this machine (fonts etc.): they fail offline
  const local = (url) => url.startsWith(URL) || url.startsWith('data:') || url.startsWith('blob:');
  page.on('console', (m) => {
    const where = (m.location() || {}).url || '';
    if (m.type() === 'error' && !(m.text().includes('net::ERR_NAME_NOT_RESOLVED') && !local(where))) problems.push(`[console] ${m.text()} @ ${where}`);
  });
  page.on('requestfailed', (r) => { if (!local(r.url())) external.push(r.url()); });
  page.on('pageerror', (e) => { problems.push(`[pageerror] ${(e.stack || e.message).slice(0, 400)}`); log('page error:', e.message); });
  page.on('request', (r) => {
    if (r.url().includes('/ella/v1/tokens')) tokenRequests.push(r.url());
    if (/\/run\/predict|\/queue\/join/.test(r.url())) events.push(r.url().replace(URL, ''));
  });
  page.on('response', (r) => { if (r.status() >= 400 && !r.url().includes('/ella/v1/tokens')) problems.push(`[http ${r.status()}] ${r.url()}`); });
  const T = 'txt2img';
  try {
    await page.goto(URL, { waitUntil: 'domcontentloaded', timeout: 120000 });
    if (LOGIN) {
      const [user, password] = LOGIN.split(':');
      await page.locator('input[type=password]').waitFor({ timeout: 60000 });
      await page.locator('input[type=text], input[name=username]').first().fill(user);
      await page.locator('input[type=password]').first().fill(password);
      await page.locator('input[type=password]').first().press('Enter');
      rec('logged in through the UI\'s login page (--gradio-auth)', true, user);
      problems.length = 0; // the login page's own 401s (Forge new's login page asks for the UI's scripts)
    }
    await page.locator(`#${T}_prompt textarea`).waitFor({ timeout: 180000 });
    await page.waitForTimeout(4000);

    let s = await counterState(page, T);
    const dom = await page.evaluate(() => {
      const b = gradioApp().querySelector('#ella_txt2img_token_button');
      return { button: !!b, buttonHidden: !!b && getComputedStyle(b).display === 'none',
        counter: !!gradioApp().querySelector('#ella_txt2img_token_counter'),
        img2img: !!gradioApp().querySelector('#ella_img2img_token_button') && !!gradioApp().querySelector('#ella_img2img_token_counter') };
    });
    rec('hidden button and counter in the DOM (both tabs), button not shown', dom.button && dom.buttonHidden && dom.counter && dom.img2img, dom);
    rec('ELLA off: counter hidden, moved beside the host counter', !s.shown && s.besideHost, s);
    await shot(page, T, '0-ella-off');

    await page.locator(`#ella_${T}_accordion .label-wrap`).first().click();
    await page.waitForTimeout(600);
    // the default text encoder is the official one, not downloaded here: the counter says it cannot count
    s = await waitCounter(page, T, (x) => x.shown && x.text === 'ELLA ?');
    rec('ELLA on, official LLM not downloaded: "ELLA ?" with the reason as tooltip', !s.timeout && /flan-T5-XL|download/i.test(s.title || ''), s);

    await pickDropdown(page, `ella_${T}_text_encoder`, ENCODER);
    const prompt = 'a red cube on top of a blue sphere, studio light';
    await typeInto(page, `#${T}_prompt textarea`, prompt);
    let want = await apiTokens(prompt);
    s = await waitCounter(page, T, (x) => x.text === `ELLA ${want}`);
    rec(`typing: "ELLA ${want}" (flexible), beside the host counter`, !s.timeout && !s.over && placed(s), s);
    await shot(page, T, '1-flexible');

    await setRadio(page, `ella_${T}_token_length`, 'Fixed');
    s = await waitCounter(page, T, (x) => x.text === `ELLA ${want}/128`);
    rec(`Fixed: "ELLA ${want}/128"`, !s.timeout && !s.over && placed(s), s);

    await setNumber(page, `#ella_${T}_max_length input[type=number]`, 5);
    s = await waitCounter(page, T, (x) => x.text === `ELLA ${want}/5`);
    rec(`Fixed, max 5: "ELLA ${want}/5" in red with a tooltip`, !s.timeout && s.over && /only the first 5/.test(s.title || '') && placed(s), s);
    await shot(page, T, '2-fixed-over');

    await setRadio(page, `ella_${T}_token_length`, 'Flexible');
    s = await waitCounter(page, T, (x) => x.text === `ELLA ${want}`);
    rec('back to Flexible', !s.timeout && !s.over, s);

    // the ELLA prompt replaces the main prompt for the LLM
    const own = 'a cat';
    await typeInto(page, `#ella_${T}_llm_prompt textarea`, own);
    const wantOwn = await apiTokens(own);
    s = await waitCounter(page, T, (x) => x.text === `ELLA ${wantOwn}` && /ELLA prompt/.test(x.title || ''));
    rec(`ELLA prompt counted instead: "ELLA ${wantOwn}"`, !s.timeout, s);
    await page.locator(`#ella_${T}_llm_prompt textarea`).fill('');
    s = await waitCounter(page, T, (x) => x.text === `ELLA ${want}`);
    rec('ELLA prompt cleared: the main prompt again', !s.timeout, s);

    // a long prompt: the host's counter gets wider, ours must move left
    const long = Array(40).fill('a red cube on a blue sphere').join(', ');
    await page.locator(`#${T}_prompt textarea`).fill(long);
    await page.locator(`#${T}_prompt textarea`).dispatchEvent('input');
    want = await apiTokens(long);
    s = await waitCounter(page, T, (x) => x.text === `ELLA ${want}` && /\/\s*\d+/.test(x.hostText || '') && x.hostText !== '0/75');
    await page.waitForTimeout(1500);
    s = await counterState(page, T);
    rec(`long prompt: "ELLA ${want}", host counter ${s.hostText}, no overlap`, s.text === `ELLA ${want}` && placed(s), s);
    await shot(page, T, '3-long-prompt');

    // resize the prompt box by dragging its handle
    const ta = await page.locator(`#${T}_prompt textarea`).first().boundingBox();
    await page.mouse.move(ta.x + ta.width - 3, ta.y + ta.height - 3);
    await page.mouse.down();
    await page.mouse.move(ta.x + ta.width - 3, ta.y + ta.height + 150, { steps: 5 });
    await page.mouse.up();
    await page.waitForTimeout(800);
    const ta2 = await page.locator(`#${T}_prompt textarea`).first().boundingBox();
    s = await counterState(page, T);
    rec(`prompt box resized (${Math.round(ta.height)} -> ${Math.round(ta2.height)} px): counter still at its top right`, ta2.height > ta.height + 50 && placed(s), { ...s, before: ta, after: ta2 });
    await shot(page, T, '4-resized');

    if (SETTINGS) {
      const toggle = async (on) => {
        await openTab(page, 'Settings');
        const search = page.locator('#settings_search textarea, #settings_search input').first();
        if (await search.count()) { await search.fill('token counters'); await page.waitForTimeout(800); }
        const cb = page.locator('#setting_disable_token_counters input').first();
        if (on) await cb.check(); else await cb.uncheck();
        await page.locator('#settings_submit').click();
        await page.waitForFunction((on) => opts.disable_token_counters === on, on, { timeout: 60000 }); // the host's opts
        await page.waitForTimeout(500);
        if (await search.count()) await search.fill('');
        await openTab(page, 'txt2img');
      };
      await toggle(true);
      s = await counterState(page, T);
      rec('host counters disabled in Settings: ours takes the host\'s place, shown', !s.hostShown && s.shown && placed(s), s);
      await shot(page, T, '5-host-counter-disabled');
      await toggle(false);
      s = await counterState(page, T);
      rec('host counters enabled again: ours left of it', s.hostShown && placed(s), s);
    }

    await page.locator(`#ella_${T}_accordion-visible-checkbox`).first().click();
    s = await waitCounter(page, T, (x) => !x.shown);
    rec('ELLA off: counter hidden', !s.timeout, s);
    await page.locator(`#ella_${T}_accordion-visible-checkbox`).first().click();
    s = await waitCounter(page, T, (x) => x.shown && x.text === `ELLA ${want}`);
    rec('ELLA on again: counter back', !s.timeout, s);

    // Send to img2img: img2img's ELLA is off until the parameters arrive
    const i = 'img2img';
    if (GENERATE) {
      const short = 'a green pyramid';
      await page.locator(`#${T}_prompt textarea`).fill(short);
      await page.locator(`#${T}_prompt textarea`).dispatchEvent('input');
      await setRadio(page, `ella_${T}_token_length`, 'Fixed');
      await setNumber(page, `#ella_${T}_max_length input[type=number]`, 77);
      await setNumber(page, `#${T}_steps input[type=number]`, 1);
      const seen = problems.length;
      await setNumber(page, `#${T}_width input[type=number]`, 64);
      await setNumber(page, `#${T}_height input[type=number]`, 64);
      await page.waitForTimeout(1000);
      // gradio 3 hosts: the host's own onCalcResolutionHires (_js, outputs=[]) returns values on each width/height
      // change, and gradio throws "Cannot read properties of undefined (reading 'props')": not ELLA's
      for (const e of problems.splice(seen)) (e.includes("reading 'props'") ? hostErrors : problems).push(e);
      await pickDropdown(page, `ella_${T}_connector`, 'tiny-sd15');
      await page.locator(`#${T}_generate`).click();
      const t0 = Date.now();
      let info = '';
      while (Date.now() - t0 < 300000) {
        info = await page.locator(`#html_info_${T}`).first().innerText().catch(() => '');
        if (/ELLA: tiny-sd15/.test(info)) break;
        await page.waitForTimeout(1000);
      }
      rec('txt2img with ELLA (1 step, 64x64)', /ELLA: tiny-sd15/.test(info) && !/ELLA error/.test(info), info.slice(0, 300));
      const before = await counterState(page, i);
      await page.locator(`#${T}_send_to_img2img`).click();
      await page.waitForTimeout(1000);
      if (!(await page.locator('#tab_img2img').isVisible())) await openTab(page, 'img2img');
      const wantShort = await apiTokens(short);
      s = await waitCounter(page, i, (x) => x.shown && x.text === `ELLA ${wantShort}/77`);
      rec(`Send to img2img: img2img counter "ELLA ${wantShort}/77" (was ${before.shown ? before.text : 'hidden'})`, !s.timeout && !before.shown && placed(s), s);
      await shot(page, i, '6-img2img-after-send');
      await openTab(page, 'txt2img');
    }

    // paste (↙): parameters with ELLA (fixed 64), then with an ELLA prompt, then without ELLA
    const paste = async (text) => {
      await page.locator(`#${T}_prompt textarea`).fill(text);
      await page.locator(`#tab_${T} #paste`).first().click();
    };
    await paste('a yellow star over the sea\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, ELLA: tiny-sd15, ' +
      `ELLA LLM: ${ENCODER}, ELLA tokens: fixed 64, ELLA mode: ELLA only`);
    want = await apiTokens('a yellow star over the sea');
    s = await waitCounter(page, T, (x) => x.shown && x.text === `ELLA ${want}/64`);
    rec(`paste with ELLA fixed 64: "ELLA ${want}/64"`, !s.timeout, s);
    await shot(page, T, '7-after-paste');
    await paste('a dog\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, ELLA: tiny-sd15, ' +
      `ELLA LLM: ${ENCODER}, ELLA tokens: flexible, ELLA prompt: a small brown dog sitting on the grass`);
    want = await apiTokens('a small brown dog sitting on the grass');
    s = await waitCounter(page, T, (x) => x.shown && x.text === `ELLA ${want}`);
    rec(`paste with an ELLA prompt: "ELLA ${want}"`, !s.timeout, s);
    await paste('a dog\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64');
    s = await waitCounter(page, T, (x) => !x.shown);
    rec('paste without ELLA: ELLA off, counter hidden', !s.timeout, s);

    // what the old counter's fetch sent: no Authorization header (asked from here: in headless Chromium a 401 with
    // "WWW-Authenticate: Basic" answering a page's fetch closes the page; a desktop browser asks for a password)
    const anonymous = (await fetch(`${URL}/ella/v1/tokens`, { method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ text: 'a', text_encoder: ENCODER }) })).status;
    rec(`/ella/v1/tokens without credentials: HTTP ${anonymous}`, API_AUTH ? anonymous === 401 : anonymous === 200, anonymous);
    rec('the page made no request to /ella/v1/tokens', tokenRequests.length === 0, tokenRequests);
    rec('gradio events were used', events.length > 0, `${events.length} requests, e.g. ${events.slice(0, 3).join(' ')}`);
  } catch (e) {
    rec('script exception', false, e.stack);
    await page.screenshot({ path: path.join(OUT, `${NAME}-error.png`) }).catch(() => {});
  } finally {
    rec('no page errors, console errors or HTTP errors', problems.length === 0, problems);
    if (hostErrors.length) log(`the host's own page errors on the width/height change (${hostErrors.length}):`, JSON.stringify(hostErrors.map((e) => e.slice(0, 80))));
    log('failed requests off this machine (the host\'s; offline here):', JSON.stringify(external));
    console.log('=== SUMMARY ===');
    for (const r of results) console.log((r.ok ? 'PASS ' : 'FAIL ') + r.step);
    await ctx.close();
    process.exit(results.every((r) => r.ok) ? 0 : 1);
  }
})();
