# ABC authorization policy: entrypoint data.abc.authz.decision, default deny.
package abc.authz

import rego.v1

default decision := {"allow": false, "reasons": [{"code": "bad_request", "message": "no rule allowed this action"}], "obligations": {}}
