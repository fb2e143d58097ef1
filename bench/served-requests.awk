# The requests a callgrind dump of Moonlet counted: its calls of
# DownstreamHandler.startStream (one per HTTP/1.1 request and per HTTP/2 stream).
# Used by bench/seed-instructions and bench/sidecar-instructions, which divide by it:
# callgrind may take the zeroing command a little after the load has started.
#   awk -f bench/served-requests.awk CALLGRIND_FILE...
FNR == 1 { split("", nm); cur = "" }   # name ids are per file
/^c?fn=/ {
  id = $0; sub(/^c?fn=/, "", id); key = id
  if (match(id, /^\([0-9]+\) /)) { key = substr(id, 1, RLENGTH - 1); nm[key] = substr(id, RLENGTH + 1) }
  if ($0 ~ /^cfn=/) cur = nm[key]
  next
}
/^calls=/ { if (cur ~ /DownstreamHandlerC11startStream/ && cur !~ /TW$/) { split($0, a, /[= ]/); t += a[2] } }
END { print t + 0 }
