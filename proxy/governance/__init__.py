"""Governance over the traffic Keyless already sees: learn a policy from the audit log
(``learn``), evaluate a candidate beside the enforcing policy (``shadow``) and replay recorded
decisions against a candidate (``replay``). Nothing here is on the request path except
``shadow.Shadow.decide``, which never raises."""
