"""A real LangGraph graph: a trunk node, then a `Send` map-reduce fan-out of reviewers over the trunk's
conversation, reduced by a summary node. Every reviewer reads the trunk from vLLM's cache (its own count)."""

import operator
from typing import Annotated, TypedDict

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from conftest import PAGE

ASPECTS = ["security", "style", "performance", "correctness"]


class Review(TypedDict):
    aspect: str
    prompt_token_ids: list
    cached_tokens: int
    text: str


class State(TypedDict):
    diff: str
    plan: str
    trunk_ids: list  # the plan node's prompt and reply, as the token ids a later prompt keeps
    reviews: Annotated[list, operator.add]
    summary: str


def build(chat):
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Send

    def trunk_messages(diff: str) -> list:
        return [SystemMessage("You review pull requests. " + "Name the file and line of every finding. " * 6),
                HumanMessage(f"Here is the diff:\n{diff}\nFirst, plan the review.")]

    def plan(state: State) -> dict:
        reply = chat.invoke(trunk_messages(state["diff"]))
        meta = reply.response_metadata
        return {"plan": reply.content, "trunk_ids": meta["prompt_token_ids"] + chat.chat_tokens.kept(meta["token_ids"])}

    def fan_out(state: State) -> list:
        return [Send("review", {**state, "aspect": a}) for a in ASPECTS]

    def review(state: dict) -> dict:
        messages = trunk_messages(state["diff"]) + [AIMessage(state["plan"]),
                                                    HumanMessage(f"Now review only the {state['aspect']}.")]
        reply = chat.invoke(messages)
        meta = reply.response_metadata
        return {"reviews": [Review(aspect=state["aspect"], prompt_token_ids=meta["prompt_token_ids"],
                                   cached_tokens=meta["cached_tokens"], text=reply.content)]}

    def summarize(state: State) -> dict:
        joined = "\n".join(f"{r['aspect']}: {r['text']}" for r in state["reviews"])
        return {"summary": chat.invoke([HumanMessage(f"Summarize these reviews:\n{joined}")]).content}

    graph = StateGraph(State)
    graph.add_node("plan", plan)
    graph.add_node("review", review)
    graph.add_node("summarize", summarize)
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", fan_out, ["review"])
    graph.add_edge("review", "summarize")
    graph.add_edge("summarize", END)
    return graph.compile()


def test_send_fan_out_branches_share_one_trunk(chat):
    app = build(chat)
    diff = "- return cache[key]\n+ return cache.get(key, default)"
    out = app.invoke({"diff": diff, "plan": "", "trunk_ids": [], "reviews": [], "summary": ""})
    assert sorted(r["aspect"] for r in out["reviews"]) == sorted(ASPECTS) and out["summary"] is not None

    trunk = out["trunk_ids"]
    for r in out["reviews"]:
        assert r["prompt_token_ids"][: len(trunk)] == trunk  # one trunk, token for token
        # vLLM's own count: the trunk was not prefilled again (all of it but the page of its last token).
        assert r["cached_tokens"] >= (len(trunk) - 1) // PAGE * PAGE > 0, r["aspect"]
