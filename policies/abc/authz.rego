# ABC authorization policy.
#
# Entrypoint: data.abc.authz.decision = {"allow", "reasons", "obligations"}.
# data.abc.manifest is the verified manifest; data.abc.index is the same manifest keyed by
# target, so every rule looks a capability up instead of scanning a list.
# input = {"action": {kind, target, args, max_tokens, method, path},
#          "run": {"step", "completed_steps"}}
# Budgets and the validity window are enforced by the PDP outside the policy.
#
# Default deny: an action is allowed only when a rule below grants it positively and
# no rule refuses it. Messages never echo argument values (they are the agent's data).
package abc.authz

import rego.v1

index := data.abc.index

action := input.action

default decision := {
	"allow": false,
	"reasons": [{"code": "bad_request", "message": "action kind is not model, tool, http or step"}],
	"obligations": {}
}

decision := {"allow": allow, "reasons": reasons, "obligations": obligations} if {
	action.kind in {"model", "tool", "http", "step"}
}

default allow := false

allow if {
	granted
	count(denials) == 0
}

reasons := [r | some r in denials] if {
	count(denials) > 0
} else := [] if {
	allow
} else := [{"code": "bad_request", "message": "no rule granted this action"}]

# ---- models -------------------------------------------------------------------------

granted if {
	action.kind == "model"
	index.models[action.target]
	in_current_step
}

denials contains {"code": "model_not_allowed", "message": sprintf("%s is not in the manifest", [action.target])} if {
	action.kind == "model"
	not index.models[action.target]
}

requested_tokens := object.get(action, "max_tokens", 0)

default obligations := {}

obligations := {"max_tokens": cap} if {
	allow
	action.kind == "model"
	cap := token_cap(index.models[action.target].max_tokens_per_call)
}

token_cap(limit) := requested_tokens if {
	requested_tokens > 0
	requested_tokens <= limit
} else := limit

# ---- tools --------------------------------------------------------------------------

granted if {
	action.kind == "tool"
	index.tools[action.target]
	in_current_step
	count(arg_violations) == 0
}

denials contains {"code": "tool_not_allowed", "message": sprintf("%s is not in the manifest", [action.target])} if {
	action.kind == "tool"
	not index.tools[action.target]
}

denials contains {"code": "tool_args_invalid", "message": violation} if {
	action.kind == "tool"
	index.tools[action.target]
	some violation in arg_violations
}

tool_args := object.get(action, "args", {})

declared := index.tools[action.target].args

arg_violations contains sprintf("argument %s is not declared", [name]) if {
	some name, _ in tool_args
	not declared[name]
}

arg_violations contains sprintf("argument %s is required", [name]) if {
	some name, constraint in declared
	constraint.required
	not has_key(tool_args, name)
}

arg_violations contains sprintf("argument %s is not of type %s", [name, c.type]) if {
	some name, value in tool_args
	c := declared[name]
	not type_ok(c.type, value)
}

arg_violations contains sprintf("argument %s is not one of the allowed values", [name]) if {
	some name, value in tool_args
	c := declared[name]
	c.enum
	not value in c.enum
}

arg_violations contains sprintf("argument %s is longer than maxLength %d", [name, c.maxLength]) if {
	some name, value in tool_args
	c := declared[name]
	is_string(value)
	count(value) > c.maxLength
}

arg_violations contains sprintf("argument %s is shorter than minLength %d", [name, c.minLength]) if {
	some name, value in tool_args
	c := declared[name]
	is_string(value)
	count(value) < c.minLength
}

arg_violations contains sprintf("argument %s does not match pattern %s", [name, c.pattern]) if {
	some name, value in tool_args
	c := declared[name]
	is_string(value)
	c.pattern
	not regex.match(c.pattern, value)
}

arg_violations contains sprintf("argument %s is below minimum %d", [name, c.minimum]) if {
	some name, value in tool_args
	c := declared[name]
	is_number(value)
	value < c.minimum
}

arg_violations contains sprintf("argument %s is above maximum %d", [name, c.maximum]) if {
	some name, value in tool_args
	c := declared[name]
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

http_host := trim_prefix(action.target, "http:")

path_segments := split(action.path, "/")

clean_path if {
	startswith(action.path, "/")
	not ".." in path_segments
	not "." in path_segments
	not contains(lower(action.path), "%2e")
	not contains(action.path, "\\")
}

granted if {
	action.kind == "http"
	in_current_step
	clean_path
	some rule in index.http[http_host]
	http_rule_matches(rule)
}

http_rule_matches(rule) if {
	action.method in rule.methods
	startswith(action.path, rule.path_prefix)
}

denials contains {"code": "http_not_allowed", "message": sprintf("%s is not in the manifest", [action.target])} if {
	action.kind == "http"
	not index.http[http_host]
}

denials contains {"code": "http_not_allowed", "message": "path is not clean (dot segments, encoded dots or backslashes)"} if {
	action.kind == "http"
	not clean_path
}

denials contains {"code": "http_not_allowed", "message": sprintf("no rule for %s allows this method and path", [action.target])} if {
	action.kind == "http"
	index.http[http_host]
	clean_path
	not any_http_rule_matches
}

any_http_rule_matches if {
	some rule in index.http[http_host]
	http_rule_matches(rule)
}

# ---- the Assembly: step order ---------------------------------------------------------

current_step := index.steps[input.run.step]

in_current_step if current_step.uses[action.target]

declared_capability if index.models[action.target]

declared_capability if index.tools[action.target]

declared_capability if index.http[http_host]

denials contains {"code": "step_out_of_order", "message": sprintf("step %s does not use %s", [input.run.step, action.target])} if {
	action.kind in {"model", "tool", "http"}
	declared_capability
	not in_current_step
}

step_id := trim_prefix(action.target, "step:")

done_steps := {s | some s in input.run.completed_steps} | {input.run.step}

granted if {
	action.kind == "step"
	step_ready
}

step_ready if {
	step := index.steps[step_id]
	not step_id in done_steps
	every before in step.after {
		before in done_steps
	}
}

denials contains {"code": "step_out_of_order", "message": sprintf("step %s is not in the assembly", [step_id])} if {
	action.kind == "step"
	not index.steps[step_id]
}

denials contains {"code": "step_out_of_order", "message": sprintf("step %s was already entered", [step_id])} if {
	action.kind == "step"
	index.steps[step_id]
	step_id in done_steps
}

denials contains {"code": "step_out_of_order", "message": sprintf("step %s needs step %s first", [step_id, before])} if {
	action.kind == "step"
	some before in index.steps[step_id].after
	not before in done_steps
}
