# Rego unit tests for abc.authz, run by `abcctl policy test policies/`.
package abc.authz_test

import rego.v1

import data.abc.authz

capabilities := {
	"model:openai/gpt-4o-mini": {"kind": "model", "max_tokens_per_call": 1000, "steps": {"research": true, "answer": true, "publish": true}},
	"tool:kb/search": {"kind": "tool", "steps": {"research": true}, "args": {
		"query": {"type": "string", "required": true, "maxLength": 10, "minLength": 2},
		"top_k": {"type": "integer", "minimum": 1, "maximum": 20},
		"lang": {"type": "string", "enum": ["en", "fr"]},
		"id": {"type": "string", "pattern": "^KB-[0-9]+$"}
	}},
	"tool:kb/ping": {"kind": "tool", "args": {}, "steps": {"research": true}},
	"http:billing.internal": {"kind": "http", "rules": [{"methods": ["GET"], "path_prefix": "/v1/invoices/"}], "steps": {"research": true}},
	"resource:kb/file:///docs/": {"kind": "resource", "server": "kb", "uri_prefix": "file:///docs/", "steps": {"research": true}},
	"resource:kb/kb://faq/": {"kind": "resource", "server": "kb", "uri_prefix": "kb://faq/", "steps": {"answer": true}},
	"prompt:kb/summarize": {"kind": "prompt", "steps": {"answer": true}}
}

resources := {"kb": ["resource:kb/file:///docs/", "resource:kb/kb://faq/"]}

steps := {"research": {"after": []}, "answer": {"after": ["research"]}, "publish": {"after": ["answer"]}}

research := {"step": "research", "completed_steps": []}

# A slice of the closest-names table pdp/engine/index.py makes ("kind:prefix" -> names),
# enough for the tests below; building it here for every name made the suite take a minute.
prefixes := {
	"tool:kb/": ["tool:kb/ping", "tool:kb/search"],
	"tool:kb/se": ["tool:kb/search"],
	"tool:kb/ser": ["tool:kb/search"],
	"step:ans": ["step:answer"],
	"step:answ": ["step:answer"],
}

decide(act, run) := d if {
	index := {"targets": capabilities, "steps": steps, "prefixes": prefixes, "resources": resources}
	d := authz.decision with data.abc.index as index with input as {"action": act, "run": run}
}

codes(d) := {r.code | some r in d.reasons}

search(args) := {"kind": "tool", "target": "tool:kb/search", "args": args}

test_kind_must_match_the_declared_capability if {
	# A tool target is never judged as a model, whatever kind a caller claims.
	codes(decide({"kind": "model", "target": "tool:kb/ping"}, research)) == {"model_not_allowed"}
}

test_tool_allowed if {
	d := decide(search({"query": "invoice", "top_k": 5}), research)
	d.allow
	d.reasons == []
}

test_unknown_tool_refused if {
	d := decide({"kind": "tool", "target": "tool:kb/delete", "args": {"query": "x"}}, research)
	not d.allow
	codes(d) == {"tool_not_allowed"}
}

test_tool_without_args_field_allowed_when_none_required if {
	decide({"kind": "tool", "target": "tool:kb/ping"}, research).allow
}

test_undeclared_argument_refused if {
	codes(decide(search({"query": "abc", "sudo": true}), research)) == {"tool_args_invalid"}
}

test_missing_required_argument_refused if {
	codes(decide(search({"top_k": 3}), research)) == {"tool_args_invalid"}
}

test_wrong_type_refused if {
	not decide(search({"query": 42}), research).allow
	not decide(search({"query": "ab", "top_k": 2.5}), research).allow
	not decide(search({"query": "ab", "top_k": "3"}), research).allow
}

test_integer_given_as_whole_double_allowed if {
	decide(search({"query": "ab", "top_k": 3.0}), research).allow
}

test_length_bounds if {
	not decide(search({"query": "abcdefghijk"}), research).allow
	decide(search({"query": "abcdefghij"}), research).allow
	not decide(search({"query": "a"}), research).allow
}

test_numeric_bounds if {
	not decide(search({"query": "ab", "top_k": 0}), research).allow
	not decide(search({"query": "ab", "top_k": 21}), research).allow
	decide(search({"query": "ab", "top_k": 20}), research).allow
}

test_enum if {
	decide(search({"query": "ab", "lang": "fr"}), research).allow
	not decide(search({"query": "ab", "lang": "de"}), research).allow
}

test_pattern if {
	decide(search({"query": "ab", "id": "KB-42"}), research).allow
	not decide(search({"query": "ab", "id": "KB-42; rm -rf"}), research).allow
	# A NUL is a character like any other: nothing after it escapes the pattern.
	not decide(search({"query": "ab", "id": "KB-1\u0000../../etc/passwd"}), research).allow
}

test_lengths_count_characters_not_bytes if {
	decide(search({"query": "éé"}), research).allow
	decide(search({"query": "１２３４５６７８９０"}), research).allow
	not decide(search({"query": "１２３４５６７８９０x"}), research).allow
	not decide(search({"query": "ab\u0000cdefghij"}), research).allow
}

# The first reason is the one reported: by the policy's precedence, not by a set's order.
test_reasons_follow_the_documented_precedence if {
	late := {"step": "answer", "completed_steps": ["research"]}
	d := decide(search({"query": "a", "colour": "red"}), late)
	[r.code | some r in d.reasons] == ["step_out_of_order", "tool_args_invalid", "tool_args_invalid"]
	h := decide({"kind": "http", "target": "http:evil.example", "method": "GET", "path": "/../x"}, research)
	h.reasons[0].message == "http:evil.example is not in the manifest"
	p := decide(invoice("POST", "/v1/invoices/../x"), research)
	[r.evidence.check | some r in p.reasons] == ["clean_path"]
}

test_model_allowed_with_token_cap_obligation if {
	d := decide({"kind": "model", "target": "model:openai/gpt-4o-mini", "max_tokens": 5000}, research)
	d.allow
	d.obligations == {"max_tokens": 1000}
	small := decide({"kind": "model", "target": "model:openai/gpt-4o-mini", "max_tokens": 200}, research)
	small.obligations == {"max_tokens": 200}
	none := decide({"kind": "model", "target": "model:openai/gpt-4o-mini"}, research)
	none.obligations == {"max_tokens": 1000}
}

test_unknown_model_refused if {
	codes(decide({"kind": "model", "target": "model:openai/gpt-5"}, research)) == {"model_not_allowed"}
}

invoice(method, path) := {"kind": "http", "target": "http:billing.internal", "method": method, "path": path}

test_http_allowed if {
	decide(invoice("GET", "/v1/invoices/42"), research).allow
}

test_http_refusals if {
	codes(decide(invoice("POST", "/v1/invoices/42"), research)) == {"http_not_allowed"}
	codes(decide(invoice("GET", "/v1/customers/1"), research)) == {"http_not_allowed"}
	codes(decide({"kind": "http", "target": "http:evil.example", "method": "GET", "path": "/v1/invoices/1"}, research)) == {"http_not_allowed"}
}

test_http_path_escapes_refused if {
	not decide(invoice("GET", "/v1/invoices/../../admin"), research).allow
	not decide(invoice("GET", "/v1/invoices/%2e%2e/admin"), research).allow
	not decide(invoice("GET", "/v1/invoices/%2E%2E/admin"), research).allow
	not decide(invoice("GET", "/v1/invoices/./x"), research).allow
	not decide(invoice("GET", "/v1/invoices/..\\admin"), research).allow
	not decide(invoice("GET", "/v1/invoices/..%2f..%2fadmin"), research).allow
	not decide(invoice("GET", "/v1/invoices/..%2F..%2Fadmin"), research).allow
	not decide(invoice("GET", "/v1/invoices/%252e%252e/admin"), research).allow
	not decide(invoice("GET", "/v1/invoices/..;/admin"), research).allow
	not decide(invoice("GET", "/v1/invoices/x%5cadmin"), research).allow
	not decide(invoice("GET", `/v1/invoices/..\..\admin`), research).allow
	not decide(invoice("GET", "/v1/invoices/%e0%80%ae%e0%80%ae/admin"), research).allow
	not decide(invoice("GET", "/v1/invoices/%F0%80%80%AE%f0%80%80%ae/admin"), research).allow
	not decide(invoice("GET", "/v1/invoices/%c0%ae%c0%ae/admin"), research).allow
	decide(invoice("GET", "/v1/invoices/a..b/c.d"), research).allow
}

test_capability_outside_current_step_refused if {
	d := decide(search({"query": "abc"}), {"step": "answer", "completed_steps": ["research"]})
	codes(d) == {"step_out_of_order"}
}

test_step_change_in_order if {
	decide({"kind": "step", "target": "step:answer"}, research).allow
}

test_step_change_skipping_ahead_refused if {
	codes(decide({"kind": "step", "target": "step:publish"}, research)) == {"step_out_of_order"}
}

test_entering_the_current_step_again_is_a_no_op if {
	d := decide({"kind": "step", "target": "step:research"}, research)
	d.allow
	d.reasons == []
	decide({"kind": "step", "target": "step:answer"}, {"step": "answer", "completed_steps": ["research"]}).allow
}

test_step_change_backwards_refused if {
	d := decide({"kind": "step", "target": "step:research"}, {"step": "answer", "completed_steps": ["research"]})
	codes(d) == {"step_out_of_order"}
}

test_run_may_end_from_any_step if {
	decide({"kind": "step", "target": "step:@completed"}, research).allow
	decide({"kind": "step", "target": "step:@failed"}, {"step": "answer", "completed_steps": ["research"]}).allow
}

test_unknown_run_ending_refused if {
	codes(decide({"kind": "step", "target": "step:@paused"}, research)) == {"step_out_of_order"}
}

test_unknown_step_refused if {
	codes(decide({"kind": "step", "target": "step:exfiltrate"}, research)) == {"step_out_of_order"}
}

test_probe_judges_the_target_not_the_arguments if {
	decide({"kind": "tool", "target": "tool:kb/search", "probe": true}, research).allow
	codes(decide({"kind": "tool", "target": "tool:kb/delete", "probe": true}, research)) == {"tool_not_allowed"}
	d := decide({"kind": "tool", "target": "tool:kb/search", "probe": true}, {"step": "answer", "completed_steps": ["research"]})
	codes(d) == {"step_out_of_order"}
}

test_unknown_kind_refused if {
	d := decide({"kind": "teleport", "target": "x"}, research)
	not d.allow
	codes(d) == {"bad_request"}
}

test_empty_manifest_allows_nothing if {
	d := authz.decision with data.abc.index.targets as {}
		with data.abc.index.steps as {"s": {"after": []}}
		with input.action as {"kind": "model", "target": "model:openai/gpt-4o-mini"}
		with input.run as {"step": "s", "completed_steps": []}
	not d.allow
}

# ---- evidence: what each refusal was checked against ------------------------------------

evidence_of(d, code) := [r.evidence | some r in d.reasons; r.code == code]

test_unknown_tool_names_the_closest_allowed_ones if {
	d := decide({"kind": "tool", "target": "tool:kb/serch", "args": {}}, research)
	evidence_of(d, "tool_not_allowed") == [{"target": "tool:kb/serch", "matched": null, "closest": ["tool:kb/search"]}]
}

test_unknown_step_names_the_closest_step if {
	d := decide({"kind": "step", "target": "step:answr"}, research)
	evidence_of(d, "step_out_of_order") == [{"step": "answr", "matched": null, "closest": ["step:answer"]}]
}

test_unknown_tool_far_from_everything_has_no_closest if {
	d := decide({"kind": "tool", "target": "tool:zz/qqqq", "args": {}}, research)
	evidence_of(d, "tool_not_allowed")[0].closest == []
}

test_argument_evidence_names_the_constraint if {
	long := evidence_of(decide(search({"query": "far too long a query"}), research), "tool_args_invalid")
	long == [{"capability": "tool:kb/search", "argument": "query", "constraint": {"maxLength": 10}}]
	bad := evidence_of(decide(search({"query": "abc", "id": "XX-1"}), research), "tool_args_invalid")
	bad == [{"capability": "tool:kb/search", "argument": "id", "constraint": {"pattern": "^KB-[0-9]+$"}}]
}

test_step_evidence_names_where_the_capability_is_allowed if {
	d := decide(search({"query": "abc"}), {"step": "answer", "completed_steps": ["research"]})
	evidence_of(d, "step_out_of_order") == [{"capability": "tool:kb/search", "step": "answer", "allowed_in": ["research"]}]
}

test_step_evidence_names_the_missing_predecessor if {
	d := decide({"kind": "step", "target": "step:publish"}, research)
	evidence_of(d, "step_out_of_order") == [{"step": "publish", "after": ["answer"], "completed": [], "current": "research"}]
}

# ---- MCP resources and prompts ----

answering := {"step": "answer", "completed_steps": ["research"]}

resource(uri) := {"kind": "resource", "target": concat("", ["resource:kb/", uri])}

test_resource_granted_by_uri_prefix if {
	decide(resource("file:///docs/refunds.md"), research).allow
	decide(resource("kb://faq/billing"), answering).allow
}

test_resource_outside_every_prefix_refused if {
	codes(decide(resource("file:///etc/passwd"), research)) == {"resource_not_allowed"}
	# Another server's resource, though its URI fits kb's prefix.
	codes(decide({"kind": "resource", "target": "resource:other/file:///docs/a"}, research)) == {"resource_not_allowed"}
}

test_resource_in_another_step_refused if {
	codes(decide(resource("kb://faq/billing"), research)) == {"step_out_of_order"}
}

test_resource_probe_judged_like_a_read if {
	decide(object.union(resource("file:///docs/a"), {"probe": true}), research).allow
	not decide(object.union(resource("file:///secret"), {"probe": true}), research).allow
}

test_prompt_granted_by_name_in_its_step if {
	decide({"kind": "prompt", "target": "prompt:kb/summarize"}, answering).allow
	codes(decide({"kind": "prompt", "target": "prompt:kb/summarize"}, research)) == {"step_out_of_order"}
	codes(decide({"kind": "prompt", "target": "prompt:kb/jailbreak"}, answering)) == {"prompt_not_allowed"}
}

test_a_tool_is_not_granted_as_a_prompt if {
	codes(decide({"kind": "prompt", "target": "prompt:kb/search"}, research)) == {"prompt_not_allowed"}
}
