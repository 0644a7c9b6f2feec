"""A real LangGraph graph (examples/langgraph_reviewers.py): a plan node, then a `Send` map-reduce fan-out of
four reviewers over the plan's conversation, reduced by a summary node. Every reviewer reads the trunk from
the engine's cache, by the engine's own count."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def test_send_fan_out_branches_share_one_trunk(chat, kind, plain):
    from langgraph_reviewers import ASPECTS, build_graph, make_diff, review

    out = review(build_graph(chat), make_diff(12))
    assert sorted(r["aspect"] for r in out["reviews"]) == sorted(ASPECTS) and out["summary"] is not None
    trunk = out["trunk_ids"]  # the plan node's prompt and reply
    for r in out["reviews"]:
        assert r["prompt_token_ids"][: len(trunk)] == trunk  # one trunk, token for token
        # The engine's own count: the trunk was not prefilled again (vLLM: all but the page of its last token).
        assert r["cached_tokens"] >= kind.cached(len(trunk) - 1) > 0, r["aspect"]
        assert r["token_ids"] == plain(r["prompt_token_ids"], chat.max_tokens), r["aspect"]
