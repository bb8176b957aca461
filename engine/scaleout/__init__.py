"""Scale-out on Ray (the ray extra): Ray Serve replicas behind one endpoint, Ray Data batch jobs, and a
local Ray instance bound to loopback. Nothing else imports Ray."""
