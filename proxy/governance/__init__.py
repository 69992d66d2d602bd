"""Governance over the traffic Keyless already sees: learn a policy from the audit log
(``learn``), evaluate a candidate beside the enforcing policy (``shadow``), replay recorded
decisions against a candidate (``replay``), find the static secrets apps still send
(``discover``) and report each identity's reach and blast radius (``report``). On the request
path: ``shadow.Shadow.decide``, which never raises, and ``discover.Discovery.inspect``."""
