// ELLA: a live LLM token counter beside the host's token counter while the ELLA accordion is enabled.
// Fixed length shows "ELLA n/max" and warns past max (the LLM reads only the first max tokens); flexible length
// shows "ELLA n" and warns past 512 (T5's limit). The count is a gradio event of the ELLA accordion, as the host's
// own counter (javascript/token-counters.js): this script clicks the hidden button #ella_<tab>_token_button,
// ellaTokenCounterArgs() puts the prompt's text into the event's inputs, Python counts with the LLM's own tokenizer
// and answers with the HTML of #ella_<tab>_token_counter (ella_ext/webui/ui.py). Being a UI event, it is covered by
// the UI's own login (--gradio-auth) and needs no HTTP API (/ella/v1/tokens asks for --api-auth's credentials).
// Host facts (A1111 v1.10.1 script.js and token-counters.js, the same in both Forges): onUiLoaded(),
// onAfterUiUpdate() (after gradio changes the page, e.g. "Send to" and paste, which fire no input events),
// gradioApp(); InputAccordion's checkbox is "<accordion id>-checkbox"; the prompt box is "#<tab>_prompt textarea";
// setupTokenCounting() moves "#<tab>_token_counter" into the prompt block's parent, positioned at its top right,
// and hides it (display: none) when Settings disables token counters.
(function() {
    const DELAY_MS = 400;
    const GAP_PX = 8; // between the host's counter and ours
    const tabs = {}; // tab -> {signature(), schedule(), sent}

    function el(selector) {
        return gradioApp().querySelector(selector);
    }

    function value(selector, fallback) {
        const node = el(selector);
        return node && node.value !== undefined && node.value !== "" ? node.value : fallback;
    }

    // Put our counter left of the host's one (at the host's own place when that one is hidden).
    function place(counter, hostCounter) {
        const box = counter.parentElement;
        if (!hostCounter || hostCounter.parentElement !== box || hostCounter.offsetWidth === 0) {
            counter.style.right = "";
            return;
        }
        const right = box.getBoundingClientRect().right - hostCounter.getBoundingClientRect().left + GAP_PX;
        counter.style.right = `${Math.round(right)}px`;
    }

    function setup(tab) {
        const enabled = el(`#ella_${tab}_accordion-checkbox input`);
        const promptBlock = el(`#${tab}_prompt`);
        const prompt = el(`#${tab}_prompt textarea`);
        const counter = el(`#ella_${tab}_token_counter`);
        const button = el(`#ella_${tab}_token_button`);
        if (!enabled || !promptBlock || !prompt || !counter || !button) return;

        const box = promptBlock.parentElement;
        box.style.position = "relative";
        box.insertBefore(counter, promptBlock);
        const hostCounter = el(`#${tab}_token_counter`);
        const replace = () => place(counter, hostCounter);
        if (window.ResizeObserver) {
            const observer = new ResizeObserver(replace);
            observer.observe(box);
            if (hostCounter) observer.observe(hostCounter); // its text changes width; display: none makes it 0
        }

        let timer = null;
        let wanted = null; // what the last scheduled count is for

        // What the count depends on, as the page shows it.
        function signature() {
            return JSON.stringify([
                enabled.checked,
                prompt.value,
                value(`#ella_${tab}_llm_prompt textarea`, ""),
                value(`#ella_${tab}_text_encoder input`, ""),
                (el(`#ella_${tab}_token_length input:checked`) || {}).value,
                value(`#ella_${tab}_max_length input[type=number]`, ""),
            ]);
        }

        function ask() {
            timer = null;
            replace();
            if (!enabled.checked) {
                counter.style.display = "none";
                tabs[tab].sent = wanted;
                return;
            }
            counter.style.display = "";
            button.click();
        }

        function schedule() {
            wanted = signature();
            clearTimeout(timer);
            timer = setTimeout(ask, DELAY_MS);
        }

        tabs[tab] = {signature: signature, schedule: schedule, replace: replace, sent: null, waiting: () => timer !== null,
            changed: () => signature() !== wanted};
        prompt.addEventListener("input", schedule);
        // InputAccordion's checkbox lies outside the accordion, and its script signals a change with "input" only
        // (opening or closing an accordion changes classes, which onAfterUiUpdate does not see)
        enabled.addEventListener("input", schedule);
        enabled.addEventListener("change", schedule);
        const accordion = el(`#ella_${tab}_accordion`);
        if (accordion) {
            accordion.addEventListener("input", schedule);
            accordion.addEventListener("change", schedule);
        }
        schedule();
    }

    // Called by gradio before the count event goes to Python: its inputs are [main prompt, enabled, text encoder,
    // token length, max length, ELLA prompt] (and the output's value, which Python ignores).
    window.ellaTokenCounterArgs = function(tab, args) {
        const state = tabs[tab];
        const prompt = el(`#${tab}_prompt textarea`);
        if (state) state.sent = state.signature();
        return [prompt ? prompt.value : "", ...args.slice(1)];
    };

    // Called by gradio after each answer: gradio 3 drops a click while the previous count is still running, so ask
    // again if the inputs changed since the last request went out.
    window.ellaTokenCounterAnswered = function(tab) {
        const state = tabs[tab];
        if (!state) return [];
        state.replace();
        if (!state.waiting() && state.signature() !== state.sent) state.schedule();
        return [];
    };

    onUiLoaded(function() {
        setup("txt2img");
        setup("img2img");
    });

    onAfterUiUpdate(function() {
        Object.values(tabs).forEach((state) => {
            if (state.changed()) state.schedule();
        });
    });
})();
