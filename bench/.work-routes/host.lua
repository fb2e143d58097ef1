wrk.headers["Host"] = "svc1"
