// The npm grpc-web runtime (what browser apps bundle) driven from Node: xhr2 stands in for the
// browser's XMLHttpRequest, and raw-bytes (de)serializers stand in for protoc-generated stubs,
// matching the identity serializers of tests/e2e/grpc_svc/grpc_test_service.py.
//
// Usage: node client.js <base url> '<json list of calls>'
// A call: {"format": "text"|"binary", "kind": "unary"|"stream", "method": "Unary", "request": "..."}
// (request as latin-1 text). Prints one JSON list: per call {"messages": [...latin-1 text],
// "status": code from the "status" event or null, "error": {"code", "message"} or null}.
'use strict';
global.XMLHttpRequest = require('xhr2');
const grpcWeb = require('grpc-web');

const SERVICE = 'moorline.test.Svc';
const [base, callsJson] = process.argv.slice(2);
const calls = JSON.parse(callsJson);

function run(call) {
  return new Promise((resolve) => {
    const client = new grpcWeb.GrpcWebClientBase({format: call.format});
    const path = `/${SERVICE}/${call.method}`;
    const desc = new grpcWeb.MethodDescriptor(
      path,
      call.kind === 'stream' ? grpcWeb.MethodType.SERVER_STREAMING : grpcWeb.MethodType.UNARY,
      Object,
      Object,
      (req) => req,
      (bytes) => Buffer.from(bytes).toString('latin1'),
    );
    const req = new Uint8Array(Buffer.from(call.request, 'latin1'));
    const out = {messages: [], status: null, error: null};
    let done = false;
    const finish = () => {
      if (!done) {
        done = true;
        resolve(out);
      }
    };
    if (call.kind === 'stream') {
      const s = client.serverStreaming(base + path, req, {}, desc);
      s.on('data', (m) => out.messages.push(m));
      s.on('status', (st) => { out.status = st.code; });
      s.on('error', (e) => { out.error = {code: e.code, message: e.message}; finish(); });
      s.on('end', finish);
    } else {
      client.rpcCall(base + path, req, {}, desc, (err, resp) => {
        if (err) out.error = {code: err.code, message: err.message};
        else out.messages.push(resp);
        finish();
      });
    }
  });
}

(async () => {
  const results = [];
  for (const c of calls) results.push(await run(c));
  process.stdout.write(JSON.stringify(results) + '\n');
})();
