wrk.headers["Host"] = "svc100"
