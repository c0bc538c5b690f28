#!/usr/bin/env bash
# Not yet implemented: vLLM-server rollouts arrive with the server issue.
echo "launch_with_server.sh: not yet implemented (vLLM server rollouts are a later issue); use ./launch.sh" >&2
exit 2
