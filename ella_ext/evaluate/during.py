"""The judge's score during training (``[validation] eval_every``): a small question file answered about images of
the connector being trained, scored by the same rule as ``eval`` and logged as ``eval_score`` (and ``eval_<category>``
per broad category) beside the loss.

The main process makes the images and asks the judge (the other processes wait), so keep the question file small:
a few dozen prompts. The judge is loaded at the start (a judge that cannot load stops the run before its first step)
and stays loaded for the whole run. Images use ``eval``'s seeds, so a step's images are the
ones ``eval`` makes of the saved connector with the same settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .questions import read_questions
from .run import image_seed
from .scoring import score

log = logging.getLogger("ella")


def judging_on(config) -> bool:
    return bool(config.validation["eval_every"])


class TrainingJudge:
    """The question file's prompts encoded once; ``score(connector, step)`` makes, judges and scores their images."""

    def __init__(self, config, accelerator, base, encoder, done: int = 0):
        from ..train.config import ConfigError
        from .judges import check_judge

        validation = config.validation
        self.config, self.accelerator, self.base = config, accelerator, base
        self.every, self.images = validation["eval_every"], validation["eval_images"]
        self.done = done
        if not validation["questions"] or not validation["judge"]:
            raise ConfigError("[validation] eval_every needs [validation] questions (a small .jsonl or .csv question "
                              "file) and [validation] judge (a model folder, hub id or module:function).")
        self.questions = read_questions(Path(config.resolve(validation["questions"])))
        self.judge_spec = config.resolve(validation["judge"])
        check_judge(self.judge_spec)
        self.main = accelerator.is_main_process
        self.judge = None
        if self.main:  # loaded now: a judge that cannot load (or does not fit in memory) stops the run at its start
            from .judges import load_judge
            from .models import encode_text

            self.judge = load_judge(self.judge_spec, accelerator.device)
            self.features = {item.id: encode_text(encoder, config, item.prompt) for item in self.questions.items}
            self.empty = encode_text(encoder, config, "")
            self.pooled = {item.id: base.pooled([item.prompt]) for item in self.questions.items}
            self.empty_pooled = base.pooled([""])
            log.info("ELLA train: the judge %s scores %d prompt(s) x %d image(s) from %s every %d steps",
                     self.judge_spec, len(self.questions.items), self.images, self.questions.name, self.every)

    def due(self, step: int, end: bool = False) -> bool:
        return step != self.done and (end or step % self.every == 0)

    @torch.no_grad()
    def score(self, connector, step: int) -> dict:
        """``{"eval_score": ..., "eval_<category>": ...}`` on the main process ({} elsewhere)."""
        self.done = step
        entry = {}
        if self.main:
            entry = self._score(connector, step)
        self.accelerator.wait_for_everyone()
        return entry

    def _score(self, connector, step: int) -> dict:
        from ..train.sample import connector_contexts, denoise, pooled_pair

        device = self.accelerator.device
        was_training = connector.training
        connector.eval()
        answers = {}
        try:
            for item in self.questions.items:
                seeds = [image_seed(self.config.sample["seed"], item.prompt, i) for i in range(self.images)]
                text = self.features[item.id]
                pooled, empty_pooled = pooled_pair(connector, text, self.empty, self.pooled[item.id],
                                                   self.empty_pooled)
                context_at = connector_contexts(connector, text, self.empty, device)
                images = denoise(self.config, self.base, context_at, seeds, pooled, empty_pooled, item.prompt)
                for index, image in enumerate(images):
                    said = self.judge.answer(image, [q.text for q in item.questions])
                    answers[(item.id, index)] = {q.id: a.yes for q, a in zip(item.questions, said)}
        finally:
            connector.train(was_training)
        result = score(self.questions.items, answers, self.images)
        entry = {"eval_score": result["overall"]}
        entry.update({f"eval_{name}": value for name, value in result["categories"].items()})
        log.info("ELLA train: step %d eval_score %.2f (%s, %d prompts)", step, result["overall"], self.judge_spec,
                 len(self.questions.items))
        return entry

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()
            self.judge = None
