# A time window: the payroll batch may call the bank only on weekdays, 08:00-19:00 Paris time.
# Use context.time_ns (rego-cpp has no time.parse_rfc3339_ns; both engines have time.clock).
package keyless.examples.timewindow

import rego.v1

in_window if {
	[hour, _, _] := time.clock([input.context.time_ns, "Europe/Paris"])
	hour >= 8
	hour < 19
	not time.weekday([input.context.time_ns, "Europe/Paris"]) in {"Saturday", "Sunday"}
}

default decision := {"allow": false, "reason": "payroll may call the bank on weekdays 08:00-19:00 Paris time"}

decision := {"allow": true, "reason": "payroll inside its window", "credential": "bank-api"} if {
	input.identity.id == "spiffe://example.org/ns/payroll/sa/batch"
	input.request.host == "api.bank.example"
	in_window
}
