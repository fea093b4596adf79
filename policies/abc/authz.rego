# ABC authorization policy.
#
# Entrypoint: data.abc.authz.decision = {"allow", "reasons", "obligations"}.
# data.abc.manifest is the verified manifest. data.abc.index is the same manifest keyed
# by target, so a rule looks a capability up instead of scanning a list:
#   data.abc.index.targets[target] = {kind, steps: {step: true}, and per kind:
#       max_tokens_per_call (model) | args (tool) | rules: [{methods, path_prefix}] (http)
#       | server, uri_prefix (resource) | nothing more (prompt)}
#   data.abc.index.resources[server] = [resource targets]: a URI is granted by prefix
#   data.abc.index.steps[id] = {after: [ids]}
#   data.abc.index.prefixes["kind:prefix"] = [up to 3 names]
# input = {"action": {kind, target, args, max_tokens, method, path, probe},
#          "run": {"step", "completed_steps"}}
# Budgets and the validity window are enforced by the PDP outside the policy.
#
# Default deny: an action is allowed only when a rule below grants it positively and
# no rule refuses it. Messages never echo argument values (they are the agent's data).
#
# Every reason carries `evidence`: what it was checked against (the capability, the step,
# the argument and its constraint) or, for a name the manifest lacks, the closest names it
# has. It is the policy's own account, so `abcctl explain` and replay show exactly what
# decided, with no second judge in Python.
package abc.authz

import rego.v1

action := input.action

default decision := {
	"allow": false,
	"reasons": [{"code": "bad_request", "message": "action kind is not model, tool, http, step, resource or prompt"}],
	"obligations": {},
}

decision := {"allow": allow, "reasons": reasons, "obligations": obligations} if {
	action.kind in {"model", "tool", "http", "step", "resource", "prompt"}
}

default allow := false

allow if {
	granted
	count(denials) == 0
}

# The first reason is the one the sidecar reports, counts and logs, so the order is the
# policy's, never a set's. Precedence, most fundamental first:
#   1  the target is not in the manifest (model, tool or http host; a step not in the assembly)
#   2  the Assembly: the capability is not used by the current step, or the step cannot be
#      entered now
#   3  the HTTP path is not clean
#   4  what the call carries: tool arguments, HTTP method and path prefix
# Reasons of the same rank follow OPA's total ordering of values (by code first): the
# same input always gives the same order.
reasons := [r | some ranked in sort(denials); r := ranked[1]] if {
	count(denials) > 0
} else := [] if {
	allow
} else := [{"code": "bad_request", "message": "no rule granted this action"}]

# The manifest's entry for the action's target, if it declares one of the same kind.
capability := entry if {
	entry := data.abc.index.targets[action.target]
	entry.kind == action.kind
}

in_current_step if capability.steps[input.run.step]

# ---- models -------------------------------------------------------------------------

granted if {
	action.kind == "model"
	capability
	in_current_step
}

denials contains [1, {
	"code": "model_not_allowed",
	"message": sprintf("%s is not in the manifest", [action.target]),
	"evidence": {"target": action.target, "matched": null, "closest": closest_targets},
}] if {
	action.kind == "model"
	not capability
}

requested_tokens := object.get(action, "max_tokens", 0)

default obligations := {}

obligations := {"max_tokens": cap} if {
	allow
	action.kind == "model"
	cap := token_cap(capability.max_tokens_per_call)
}

token_cap(limit) := requested_tokens if {
	requested_tokens > 0
	requested_tokens <= limit
} else := limit

# ---- tools --------------------------------------------------------------------------

granted if {
	action.kind == "tool"
	capability
	in_current_step
	count(arg_violations) == 0
}

denials contains [1, {
	"code": "tool_not_allowed",
	"message": sprintf("%s is not in the manifest", [action.target]),
	"evidence": {"target": action.target, "matched": null, "closest": closest_targets},
}] if {
	action.kind == "tool"
	not capability
}

denials contains [4, {
	"code": "tool_args_invalid",
	"message": violation.message,
	"evidence": {"capability": action.target, "argument": violation.argument, "constraint": violation.constraint},
}] if {
	action.kind == "tool"
	capability
	some violation in arg_violations
}

# A probe asks whether a tool may be listed: the target is judged, its arguments are not.
probe if action.probe == true

tool_args := object.get(action, "args", {})

declared := capability.args

arg_violations contains {
	"message": sprintf("argument %s is not declared", [name]),
	"argument": name,
	"constraint": {"declared": sorted_keys(declared)},
} if {
	not probe
	some name, _ in tool_args
	not declared[name]
}

arg_violations contains {
	"message": sprintf("argument %s is required", [name]),
	"argument": name,
	"constraint": {"required": true},
} if {
	not probe
	some name, constraint in declared
	constraint.required
	not has_key(tool_args, name)
}

# One pass over the arguments; the first constraint an argument breaks is reported.
arg_violations contains {
	"message": sprintf("argument %s %s", [name, problem[0]]),
	"argument": name,
	"constraint": problem[1],
} if {
	not probe
	some name, value in tool_args
	constraint := declared[name]
	problem := arg_problem(constraint, value)
}

# [what is wrong, the constraint it breaks]
arg_problem(c, value) := [sprintf("is not of type %s", [c.type]), {"type": c.type}] if {
	not type_ok(c.type, value)
} else := ["is not one of the allowed values", {"enum": c.enum}] if {
	c.enum
	not value in c.enum
} else := [sprintf("is longer than maxLength %d", [c.maxLength]), {"maxLength": c.maxLength}] if {
	is_string(value)
	count(value) > c.maxLength
} else := [sprintf("is shorter than minLength %d", [c.minLength]), {"minLength": c.minLength}] if {
	is_string(value)
	count(value) < c.minLength
} else := [sprintf("does not match pattern %s", [c.pattern]), {"pattern": c.pattern}] if {
	is_string(value)
	c.pattern
	not regex.match(c.pattern, value)
} else := [sprintf("is below minimum %d", [c.minimum]), {"minimum": c.minimum}] if {
	is_number(value)
	value < c.minimum
} else := [sprintf("is above maximum %d", [c.maximum]), {"maximum": c.maximum}] if {
	is_number(value)
	value > c.maximum
}

has_key(obj, key) if {
	_ = obj[key]
}

type_ok("string", value) if is_string(value)

type_ok("integer", value) if {
	is_number(value)
	round(value) == value
}

type_ok("number", value) if is_number(value)

type_ok("boolean", value) if is_boolean(value)

type_ok("array", value) if is_array(value)

type_ok("object", value) if is_object(value)

type_ok("null", value) if is_null(value)

# ---- http ---------------------------------------------------------------------------

path_segments := split(action.path, "/")

# Refused in paths: dot segments (also "..;x", which some servers read as ".."), and any
# escape an upstream might decode into one: encoded dots, slashes, backslashes, percents,
# and overlong or invalid UTF-8 (%c0%ae, %e0%80%ae and %f0%80%80%ae are "." to a lenient
# decoder; f5-ff never start UTF-8).
clean_path if {
	startswith(action.path, "/")
	not dot_segment
	not regex.match(`%(2e|2f|5c|25|c0|c1|f[5-9a-f])|%e0%[89][0-9a-f]|%f0%8[0-9a-f]`, lower(action.path))
	not contains(action.path, "\\")
}

dot_segment if {
	some segment in path_segments
	regex.match(`^\.\.?(;.*)?$`, segment)
}

granted if {
	action.kind == "http"
	in_current_step
	clean_path
	some rule in capability.rules
	http_rule_matches(rule)
}

http_rule_matches(rule) if {
	action.method in rule.methods
	startswith(action.path, rule.path_prefix)
}

denials contains [1, {
	"code": "http_not_allowed",
	"message": sprintf("%s is not in the manifest", [action.target]),
	"evidence": {"target": action.target, "matched": null, "closest": closest_targets},
}] if {
	action.kind == "http"
	not capability
}

denials contains [3, {
	"code": "http_not_allowed",
	"message": "path is not clean (dot segments, encoded dots, slashes or percents, backslashes)",
	"evidence": {"target": action.target, "check": "clean_path"},
}] if {
	action.kind == "http"
	not clean_path
}

denials contains [4, {
	"code": "http_not_allowed",
	"message": sprintf("no rule for %s allows this method and path", [action.target]),
	"evidence": {"capability": action.target, "method": action.method, "rules": capability.rules},
}] if {
	action.kind == "http"
	capability
	clean_path
	not any_http_rule_matches
}

any_http_rule_matches if {
	some rule in capability.rules
	http_rule_matches(rule)
}

# ---- the Assembly: step order ---------------------------------------------------------

denials contains [2, {
	"code": "step_out_of_order",
	"message": sprintf("step %s does not use %s", [input.run.step, action.target]),
	"evidence": {"capability": action.target, "step": input.run.step, "allowed_in": sorted_keys(capability.steps)},
}] if {
	action.kind in {"model", "tool", "http", "prompt"}
	capability
	not in_current_step
}

# ---- MCP resources and prompts --------------------------------------------------------

# A prompt is granted by name, like a tool without arguments.
granted if {
	action.kind == "prompt"
	capability
	in_current_step
}

denials contains [1, {
	"code": "prompt_not_allowed",
	"message": sprintf("%s is not in the manifest", [action.target]),
	"evidence": {"target": action.target, "matched": null, "closest": closest_targets},
}] if {
	action.kind == "prompt"
	not capability
}

# A resource is granted by URI prefix: "resource:SERVER/URI" matches every resource
# capability of SERVER whose uri_prefix starts the URI.
resource_server := substring(bare(action.target), 0, indexof(bare(action.target), "/"))

resource_uri := substring(bare(action.target), count(resource_server) + 1, -1)

resource_grants contains target if {
	action.kind == "resource"
	some target in data.abc.index.resources[resource_server]
	startswith(resource_uri, data.abc.index.targets[target].uri_prefix)
}

granted if {
	some target in resource_grants
	data.abc.index.targets[target].steps[input.run.step]
}

denials contains [1, {
	"code": "resource_not_allowed",
	"message": sprintf("%s is not in the manifest", [action.target]),
	"evidence": {"target": action.target, "matched": null, "closest": closest_targets},
}] if {
	action.kind == "resource"
	count(resource_grants) == 0
}

denials contains [2, {
	"code": "step_out_of_order",
	"message": sprintf("step %s does not use %s", [input.run.step, action.target]),
	"evidence": {"capability": sort(resource_grants), "step": input.run.step},
}] if {
	action.kind == "resource"
	count(resource_grants) > 0
	not resource_in_current_step
}

resource_in_current_step if {
	some target in resource_grants
	data.abc.index.targets[target].steps[input.run.step]
}

step_id := trim_prefix(action.target, "step:")

step_entry := data.abc.index.steps[step_id]

done_steps := {s | some s in input.run.completed_steps} | {input.run.step}

granted if {
	action.kind == "step"
	step_ready
}

# Naming the step the run is in changes nothing, so it is granted: an agent may send the
# step header on every call of a phase (default headers, retries).
granted if {
	action.kind == "step"
	step_entry
	step_id == input.run.step
}

step_ready if {
	not step_id in done_steps
	every before in step_entry.after {
		before in done_steps
	}
}

# Ending the run only takes permissions away, so it is granted from any step: "@completed"
# when the agent is done, "@failed" when it gives up. Step ids never start with "@".
run_endings := {"@completed", "@failed"}

granted if {
	action.kind == "step"
	step_id in run_endings
}

denials contains [1, {
	"code": "step_out_of_order",
	"message": sprintf("step %s is not in the assembly", [step_id]),
	"evidence": {"step": step_id, "matched": null, "closest": closest_targets},
}] if {
	action.kind == "step"
	not step_entry
	not step_id in run_endings
}

denials contains [2, {
	"code": "step_out_of_order",
	"message": sprintf("step %s was already entered", [step_id]),
	"evidence": {"step": step_id, "current": input.run.step, "completed": input.run.completed_steps},
}] if {
	action.kind == "step"
	step_entry
	step_id in {s | some s in input.run.completed_steps}
}

denials contains [2, {
	"code": "step_out_of_order",
	"message": sprintf("step %s needs step %s first", [step_id, before]),
	"evidence": {"step": step_id, "after": step_entry.after, "completed": input.run.completed_steps, "current": input.run.step},
}] if {
	action.kind == "step"
	some before in step_entry.after
	not before in done_steps
}

# ---- explaining a name the manifest lacks ---------------------------------------------

# Up to three allowed names of the action's kind sharing the longest prefix (at least
# three characters after "kind:") with the refused one, e.g. tool:kb/serch -> tool:kb/search.
# From the prefix table made with the index: one lookup per prefix length (at most 40),
# however many capabilities the manifest has.
closest_targets := hits[0] if {
	rest := bare(action.target)
	top := min([count(rest), 40])
	top >= 3
	hits := [hit |
		some i in numbers.range(0, top - 3)
		key := concat("", [action.kind, ":", substring(rest, 0, top - i)])
		hit := data.abc.index.prefixes[key]
	]
	count(hits) > 0
} else := []

sorted_keys(obj) := sort(object.keys(obj))

bare(target) := substring(target, indexof(target, ":") + 1, -1)

