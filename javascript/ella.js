// ELLA: a live LLM token counter beside the prompt while the ELLA accordion is enabled.
// Fixed length shows "ELLA n/max" and warns past max (the LLM reads only the first max tokens); flexible length
// shows "ELLA n" and warns past 512 (T5's limit). Counts come from POST /ella/v1/tokens (the LLM's own tokenizer).
// Host facts (A1111 v1.10.1 script.js, the same in both Forges): onUiLoaded(), onAfterUiUpdate() (after gradio
// changes the page, e.g. "Send to" and paste, which fire no input events), gradioApp(); InputAccordion's checkbox
// is "<accordion id>-checkbox"; the prompt box is "#<tab>_prompt textarea".
(function() {
    const FLEXIBLE_LIMIT = 512;
    const DELAY_MS = 400;
    const watchers = []; // per tab: re-count when what the counter reads changed without an event

    function el(selector) {
        return gradioApp().querySelector(selector);
    }

    function value(selector, fallback) {
        const node = el(selector);
        return node && node.value !== undefined && node.value !== "" ? node.value : fallback;
    }

    function setup(tab) {
        const enabled = el(`#ella_${tab}_accordion-checkbox input`);
        const prompt = el(`#${tab}_prompt textarea`);
        if (!enabled || !prompt) return;
        const counter = document.createElement("div");
        counter.id = `ella_${tab}_token_counter`;
        counter.className = "ella-token-counter";
        counter.title = "Tokens the ELLA text encoder reads (the longest AND part or schedule variant)";
        prompt.parentElement.appendChild(counter);

        let timer = null;
        let asked = 0;
        let counted = null; // the inputs of the last count

        function inputs() {
            const llmPrompt = value(`#ella_${tab}_llm_prompt textarea`, "");
            const fixed = (el(`#ella_${tab}_token_length input:checked`) || {}).value === "Fixed";
            return {
                enabled: enabled.checked,
                text: llmPrompt.trim() ? llmPrompt : prompt.value,
                encoder: value(`#ella_${tab}_text_encoder input`, ""),
                fixed: fixed,
                limit: fixed ? parseInt(value(`#ella_${tab}_max_length input[type=number]`, "128"), 10) : FLEXIBLE_LIMIT,
            };
        }

        async function update() {
            const {enabled: on, text, encoder, fixed, limit} = inputs();
            if (!on) {
                counter.style.display = "none";
                return;
            }
            const ticket = ++asked;
            try {
                const response = await fetch("./ella/v1/tokens", {
                    method: "POST",
                    headers: {"Content-Type": "application/json"},
                    body: JSON.stringify({text: text, text_encoder: encoder}),
                });
                const data = await response.json();
                if (ticket !== asked) return; // a newer request is on its way
                counter.style.display = "";
                if (data.tokens === null || data.tokens === undefined) {
                    counter.textContent = "ELLA: ?";
                    counter.title = data.error || "The text encoder's tokenizer is not available yet";
                    counter.classList.remove("ella-over");
                    return;
                }
                counter.textContent = fixed ? `ELLA ${data.tokens}/${limit}` : `ELLA ${data.tokens}`;
                counter.classList.toggle("ella-over", data.tokens > limit);
                counter.title = data.tokens > limit ?
                    `Over ${limit} tokens: the text encoder reads only the first ${limit}` :
                    "Tokens the ELLA text encoder reads (the longest AND part or schedule variant)";
            } catch (e) {
                counter.style.display = "none";
            }
        }

        function schedule() {
            counted = JSON.stringify(inputs());
            clearTimeout(timer);
            timer = setTimeout(update, DELAY_MS);
        }

        watchers.push(function() {
            if (JSON.stringify(inputs()) !== counted) schedule();
        });

        prompt.addEventListener("input", schedule);
        enabled.addEventListener("change", schedule);
        const accordion = el(`#ella_${tab}_accordion`);
        if (accordion) {
            accordion.addEventListener("input", schedule);
            accordion.addEventListener("change", schedule);
        }
        schedule();
    }

    onUiLoaded(function() {
        setup("txt2img");
        setup("img2img");
    });

    onAfterUiUpdate(function() {
        watchers.forEach((check) => check());
    });
})();
