# Sourced by the profiling scripts (flamegraph.sh, where_threads_run.sh): the tiny MLP
# (examples/models/mlp, 2 replicas, batching 32) served alone, and wrk's body for it.
#
#   tiny_mlp_config ROOT PORT APP > config.yaml   # REST on 127.0.0.1:PORT, no gRPC, no admin API
#   tiny_mlp_post_lua ROOT > post.lua              # POST of the model's first expected case

tiny_mlp_config() {
  cat <<YAML
http_options: {host: 127.0.0.1, port: $2}
grpc_options: {enabled: false}
admin_options: {enabled: false}
applications:
  - name: $3
    deployments:
      - {name: mlp, model: $1/examples/models/mlp/model.onnx, num_replicas: 2, max_batch_size: 32}
YAML
}

tiny_mlp_post_lua() {
  python3 - "$1" <<'PY'
import json, sys
case = json.load(open(f"{sys.argv[1]}/examples/models/mlp/expected.json"))["cases"][0]
body = json.dumps({"inputs": case["inputs"]}).replace("\\", "\\\\").replace('"', '\\"')
print(f'wrk.method = "POST"\nwrk.body = "{body}"\nwrk.headers["Content-Type"] = "application/json"')
PY
}
