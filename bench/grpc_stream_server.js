// The backend of the grpc-stream scenario: a gRPC server-streaming method on Node's http2
// module (nghttp2 underneath), h2c on 127.0.0.1, an ephemeral port.
//
// Every POST gets one call's answer whatever its path and body: HEADERS (:status 200,
// content-type application/grpc), MESSAGES length-prefixed gRPC messages of MESSAGE_SIZE bytes
// written as they are "produced" (BATCH per write, each write waits for the stream to drain),
// then the trailers grpc-status 0. A Python (grpcio) server spends more CPU per message than
// the proxies spend forwarding it, so it would measure itself; this one does not.
//
// Usage: node bench/grpc_stream_server.js [messages] [message_size]. Prints READY port=<n>,
// serves until stdin closes or SIGTERM.
'use strict';
const http2 = require('http2');

const MESSAGES = parseInt(process.argv[2] || '1000', 10);
const MESSAGE_SIZE = parseInt(process.argv[3] || '1024', 10);
const BATCH = 16; // messages per write: 16 KiB, one DATA frame of the default max size

const one = Buffer.alloc(5 + MESSAGE_SIZE, 0x6d);
one.writeUInt8(0, 0); // not compressed
one.writeUInt32BE(MESSAGE_SIZE, 1);
const batch = Buffer.concat(Array(BATCH).fill(one));

const server = http2.createServer({
  settings: { initialWindowSize: 1 << 20, maxConcurrentStreams: 1000 },
});
server.on('stream', (stream) => {
  stream.on('error', () => {});
  stream.on('data', () => {});
  stream.on('end', () => {
    if (stream.destroyed) return;
    stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    let left = MESSAGES;
    const pump = () => {
      while (left > 0) {
        if (stream.destroyed) return;
        const k = Math.min(BATCH, left);
        left -= k;
        if (!stream.write(k === BATCH ? batch : batch.subarray(0, k * one.length))) {
          stream.once('drain', pump);
          return;
        }
      }
      stream.end();
    };
    pump();
  });
});
server.on('sessionError', () => {});
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`READY port=${server.address().port}\n`);
});
process.on('SIGTERM', () => process.exit(0));
process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();
