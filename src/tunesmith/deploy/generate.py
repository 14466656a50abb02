"""Batch generation: answer every prompt of a file with a finished run, resumably.

``tunesmith generate RUN --input prompts.jsonl --output out.jsonl`` reads the input with the same
readers as training data (JSONL/JSON/CSV/TSV/Parquet, any encoding), builds each prompt the way
the run was trained (its system prompt, its chat template, its column mapping), and answers with
the serving engine (the same decoding options as ``tunesmith serve``). Each answer is appended to
the output as soon as it and those before it are ready (input order); a stop writes the answers
already made behind an unfinished one too (out of order), and an interrupted job continues where
it stopped (rows already in the output, by ``line``, are not generated again; a half-written last
line is discarded).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith import runtime
from tunesmith.runtime import threads
from tunesmith.config import Config
from tunesmith.data.extract import extract_fields
from tunesmith.data.formats import DataError, read_table
from tunesmith.data.layouts import SPEAKERS, SYNONYMS, Source, parse_source
from tunesmith.data.render import PromptCut, answer_room, bos_ids, chat_format, encode_document, fit_prompt
from tunesmith.generation.engine import Engine, GenerationRequest, SamplingParams
from tunesmith.deploy.loading import load_for_serving, run_config
from tunesmith.runtime.progress import make_progress
from tunesmith.runs import RunError
from tunesmith.runtime.stopping import EvaluationStopped, StopRequests, Stopped

# columns that hold what the model reads, in the order they are joined (as an instruction row is in training)
PROMPT_ROLES = ("instruction", "input", "prompt", "text")
# what an output row adds to the input's fields (an input column of the same name is overwritten)
OUTPUT_FIELDS = frozenset({"line", "response", "finish_reason", "prompt_tokens", "completion_tokens", "prompt_cut",
                           "responses", "finish_reasons"})


@dataclass
class PromptRow:
    """One input record: its line (1-based, as the reader counts), the conversation to answer,
    and the input's own values (kept in the output beside the answer)."""

    line: int
    messages: list[dict[str, str]]
    values: dict[str, Any]


def read_prompts(path: str | Path, cfg: Config, skipped: list[str] | None = None,
                 notes: list[str] | None = None) -> list[PromptRow]:
    """The prompts of ``path`` as conversations, built as the run's training examples were: a
    ``messages`` column (OpenAI or ShareGPT turns; a trailing assistant turn is dropped), else the
    run's ``data.columns`` for instruction/input/prompt/text, else the usual column names for them,
    joined by a blank line; the run's system prompt first.

    The input need not be laid out like the training file: ``data.extract`` applies only when the
    input has its column, and a ``data.columns`` mapping whose column the input lacks gives way to
    the usual names (each such fallback is said in ``notes``). Each row keeps the input's own
    values (not the extracted fields). Raises DataError naming the file, line and field of a row
    with no prompt, or the columns (and the mappings that did not apply) when none holds a prompt;
    with ``skipped`` (a list), bad rows are left out and their messages appended to it instead."""
    notes = notes if notes is not None else []
    table = read_table(path, delimiter=cfg.data.delimiter, encoding=cfg.data.encoding)
    if not table.rows:
        raise DataError(f"{path}: no rows")
    given = {row.line: row.values for row in table.rows}
    spec = cfg.data.extract
    if spec is not None and spec.column in table.columns:  # fields marked inside a text, split as in training
        table = extract_fields(table, spec, skip_bad=skipped is not None)
        if skipped is not None:
            skipped.extend(table.skipped)
    elif spec is not None:
        notes.append(f"{path}: no column {spec.column!r}, so data.extract does not apply; prompts are read "
                     "from the file's own columns")
    columns = list(dict.fromkeys(k for r in table.rows[:50] for k in r.values))
    misses: list[tuple[str, str]] = []
    chat_source = _source(cfg, "messages", columns, path, misses)
    chat = chat_source.spec if chat_source is not None and chat_source.kind == "column" else None
    sources = {}
    configured = set((cfg.data.columns or {}).values())
    for role in PROMPT_ROLES:
        found = _source(cfg, role, columns, path, misses)
        if found and not (found.spec in configured and cfg.data.columns.get(role) != found.spec):  # a mapped column is read once
            sources[role] = found
    if chat is None and all(s.kind == "constant" for s in sources.values()):  # nothing read from the file
        if len(columns) != 1:
            raise DataError(f"{path}: no column holds a prompt; expected messages, or one of "
                            f"{', '.join(n for r in PROMPT_ROLES for n in SYNONYMS.get(r, (r,)))}; "
                            f"columns: {', '.join(map(repr, columns))}"
                            + "".join(f"; the run read {r} from {g!r} (data.columns.{r})" for r, g in misses))
        sources["text"] = parse_source(columns[0], columns, str(path))  # after any constant instruction
    read = [chat] if chat is not None else [f for s in sources.values() for f in ((s.spec,) if s.kind == "column" else s.fields)]
    used = ("column " if len(read) == 1 else "columns ") + ", ".join(map(repr, read))
    notes.extend(f"{path}: the run read {role} from {given_as!r} (data.columns.{role}), which this file lacks; "
                 f"prompts are read from {used}" for role, given_as in misses)
    out = []
    for row in table.rows:
        try:
            prompt = _prompt_row(row, table.where(row.line), chat, sources, cfg)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
            continue
        out.append(PromptRow(prompt.line, prompt.messages, given[row.line]))
    own = sum(r.messages[0]["role"] == "system" and r.messages[0]["content"] != cfg.data.system_prompt for r in out)
    if own and cfg.data.system_prompt:
        notes.append(f"{path}: {own} row(s) bring their own system message, which replaces the run's system prompt "
                     "(as in training)")
    return out


def _prompt_row(row: Any, where: str, chat: str | None, sources: dict[str, Any], cfg: Config) -> PromptRow:
    """One row as a conversation to answer; DataError naming ``where`` when it has no prompt."""
    if chat is not None and row.values.get(chat) is not None:
        messages = _turns(row.values[chat], chat, where)
    else:
        parts = [str(s.value(row.values) or "").strip() for s in sources.values()]
        text = "\n\n".join(p for p in parts if p)
        if not text:
            raise DataError(f"{where}: empty prompt (fields {', '.join(s.spec for s in sources.values())})")
        messages = [{"role": "user", "content": text}]
    if cfg.data.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.data.system_prompt}] + messages
    return PromptRow(row.line, messages, row.values)


def _source(cfg: Config, role: str, columns: list[str], path: str | Path,
            misses: list[tuple[str, str]]) -> Source | None:
    """Where ``role`` is read from: the run's ``data.columns`` mapping when it applies to these
    columns (else (role, mapping) goes to ``misses``), else the first usual name for the role present."""
    configured = (cfg.data.columns or {}).get(role)
    if configured:
        try:
            return parse_source(configured, columns, f"data.columns.{role} ({path})")
        except DataError:
            misses.append((role, configured))
    lower = {c.lower(): c for c in columns}
    name = next((lower[n] for n in SYNONYMS.get(role, (role,)) if n in lower), None)
    return Source("column", name) if name is not None else None


def _turns(value: Any, name: str, where: str) -> list[dict[str, str]]:
    """{role, content} (or ShareGPT {from, value}) turns up to the last user turn."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r}: expected a non-empty list of messages")
    turns = []
    for j, m in enumerate(value):
        speaker = m.get("role", m.get("from")) if isinstance(m, dict) else None
        role = SPEAKERS.get(str(speaker).lower()) if speaker is not None else None
        content = m.get("content", m.get("value")) if isinstance(m, dict) else None
        if role is None or not isinstance(content, str):
            raise DataError(f"{where}: field {name}[{j}]: expected {{role, content}} with a text content, got {m!r:.80}")
        turns.append({"role": role, "content": content})
    while turns and turns[-1]["role"] == "assistant":  # an answer given in the input is not the prompt
        turns.pop()
    if not turns or turns[-1]["role"] != "user":
        raise DataError(f"{where}: field {name!r}: no user message to answer")
    return turns


def done_lines(output: Path, rows: list[PromptRow] | None = None, input: str | Path = "the input") -> set[int]:
    """Input lines already answered in ``output``; a half-written last line (a crash mid-write) is cut off.

    With ``rows`` (the input's prompts), each answered row must be the answer to the input row of
    its line: the fields it carries equal that row's. Raises DataError naming the output line, the
    field and both values when it is not (``output`` was written for another input, or the input
    changed), or when a line is not one tunesmith generate wrote."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the process died while writing this line: drop it, it is generated again
        with open(output, "r+b") as f:
            f.truncate(end)
    by_line = {r.line: r for r in rows} if rows is not None else None
    lines = set()
    for i, raw in enumerate(data[:end].splitlines(), 1):
        try:
            answer = json.loads(raw)
            line = int(answer["line"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{output}:{i}: not a line tunesmith generate wrote; choose another --output") from None
        if by_line is not None:
            _same_input(answer, by_line.get(line), f"{output}:{i}", input, line)
        lines.add(line)
    return lines


def _same_input(answer: dict[str, Any], row: PromptRow | None, where: str, input: str | Path, line: int) -> None:
    """DataError unless ``answer`` (a line of the output) answers ``row`` (the input's row of its line)."""
    again = "; choose another --output, or delete it to answer every row again"
    if row is None:
        raise DataError(f"{where}: answers line {line}, which {input} does not have (the output was written for "
                        f"another input){again}")
    for key, value in row.values.items():
        if key.startswith("_") or key in OUTPUT_FIELDS:  # not written, or written over by the answer
            continue
        value = json.loads(json.dumps(value, ensure_ascii=False, default=str))  # as the output stores it
        if key not in answer or answer[key] != value:
            raise DataError(f"{where}: answers another input's line {line}: field {key!r} is "
                            f"{answer.get(key, '(missing)')!r:.60} there, {value!r:.60} in {input}{again}")


def generate_file(run_dir: str | Path, input: str | Path, output: str | Path, params: SamplingParams | None = None,
                  console: Console | None = None, max_batch_size: int = 16, skip_bad_rows: bool = False) -> dict[str, Any]:
    """Answer every prompt of ``input`` with the run in ``run_dir``; append JSON lines to ``output``:
    the input's values, ``line``, ``response`` (``responses`` when ``params.n > 1``), ``finish_reason``
    and token counts. Rows already in ``output`` are skipped (resume). Returns {rows, generated,
    skipped, bad_rows, seconds, completion_tokens}. ``skip_bad_rows``: leave out (and list) input rows
    with no usable prompt instead of stopping. Prompts may fill the model's context (``context`` in
    the result); a longer one is cut and its row says how (``prompt_cut``; ``prompts_cut`` counts
    them). SIGTERM/Ctrl-C stops at the next decoding step, the rows answered so far written (``Stopped``:
    rerun to continue).
    Raises RunError, DataError (input or output), ModelError."""
    console = console or Console()
    params = params or SamplingParams()
    run_dir, output = Path(run_dir), Path(output)
    cfg = run_config(run_dir)
    bad: list[str] = []
    notes: list[str] = []
    rows = read_prompts(input, cfg, bad if skip_bad_rows else None, notes)
    for note in notes:  # the input is laid out otherwise than the training data: say how it was read
        console.print(f"note: {note}", highlight=False)
    for message in bad[:5]:
        console.print(f"[yellow]skipped: {message}[/yellow]", highlight=False)
    if len(bad) > 5:
        console.print(f"[yellow]... and {len(bad) - 5} more bad row(s)[/yellow]")
    done = done_lines(output, rows, input)
    todo = [r for r in rows if r.line not in done]
    summary: dict[str, Any] = {"rows": len(rows), "skipped": len(rows) - len(todo), "bad_rows": len(bad), "generated": 0,
                               "completion_tokens": 0}
    if done and todo:
        console.print(f"{output}: {len(rows) - len(todo)} of {len(rows)} rows already answered; generating the rest")
    if not todo:
        return summary | {"seconds": 0.0}
    threads.use_threads(cfg.train.num_threads, lambda line: console.print(line, highlight=False))
    group = load_for_serving([run_dir])[0]
    adapter = group.names[run_dir.name]
    stops = tuple(chat_format(group.tokenizer).stop_ids) if cfg.task != "text" else (group.tokenizer.eos_token_id,)
    params = SamplingParams(**{**vars(params), "stop_ids": tuple(dict.fromkeys(params.stop_ids + stops))})
    engine = Engine(group.model, group.tokenizer, max_batch_size=max_batch_size, bf16=runtime.INFERENCE_BF16,
                    background=False)
    budget = engine.context_length - 1  # the model's context, as serve allows; the answer gets what is left
    t0 = time.perf_counter()
    summary["prompts_cut"], summary["hit_max_tokens"], summary["max_tokens"] = 0, 0, params.max_tokens
    stop = StopRequests()
    try:
        with stop, make_progress(console) as progress:
            room = answer_room(engine.context_length, params.max_tokens)  # kept for the answer when a prompt is cut
            prompts = [_prompt_ids(group.tokenizer, r, cfg, budget, engine.context_length - room) for r in todo]
            task = progress.add_task("generating", total=len(todo), info="")

            def write(i: int, result: Any) -> None:  # each answer as soon as it and those before it are made
                summary["generated"] += 1
                summary["completion_tokens"] += result.completion_tokens
                summary["prompts_cut"] += prompts[i][1] is not None
                summary["hit_max_tokens"] += all(c.finish_reason == "length" for c in result.choices)
                _append(output, _output_row(todo[i], result, params.n, prompts[i][1]))
                rate = summary["completion_tokens"] / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, advance=1, info=f"{rate:.0f} tok/s")

            try:
                engine.generate([GenerationRequest(ids, adapter, params) for ids, _ in prompts],
                                should_stop=lambda: stop.requested, on_result=write)
            except EvaluationStopped:
                raise Stopped(f"{output}: {stop.signal} with {summary['generated'] + summary['skipped']} of "
                              f"{len(rows)} rows answered; run the same command again to answer the rest") from None
    finally:
        engine.shutdown(drain=False)
    return summary | {"seconds": time.perf_counter() - t0, "context": engine.context_length}


def _prompt_ids(tokenizer: Any, row: PromptRow, cfg: Config, budget: int, cut_to: int) -> tuple[list[int], PromptCut | None]:
    """The row's prompt ids: whole within ``budget`` tokens (the model's context), else cut to
    ``cut_to`` (room left for the answer), and how it was cut, if it was."""
    if cfg.task == "text":  # a language model of raw text continues it: its end is kept
        ids = encode_document(tokenizer, row.messages[-1]["content"])
        if len(ids) <= budget:
            return ids, None
        bos = bos_ids(tokenizer)  # kept at the start, as the model was trained
        return bos + ids[len(ids) - cut_to + len(bos):], PromptCut(len(ids), cut_to, "the start of the text")
    return fit_prompt(tokenizer, row.messages, budget, cfg.data.truncation_side, f"line {row.line}", cut_to)


def _output_row(row: PromptRow, result: Any, n: int, cut: PromptCut | None = None) -> dict[str, Any]:
    texts = [c.text for c in result.choices]
    reasons = [c.finish_reason for c in result.choices]
    out = {k: v for k, v in row.values.items() if not k.startswith("_")}
    out |= {"line": row.line, "response": texts[0], "finish_reason": reasons[0],
            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
    if cut is not None:  # the prompt was longer than the model's context: what was left out
        out["prompt_cut"] = cut.as_dict()
    if n > 1:
        out |= {"responses": texts, "finish_reasons": reasons}
    return out


def _append(path: Path, record: dict[str, Any]) -> None:
    """One line, written whole and flushed to disk: a crash leaves at most a partial last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        f.flush()


__all__ = ["PromptRow", "RunError", "done_lines", "generate_file", "read_prompts"]
