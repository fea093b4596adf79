// Calling the ABC PDP from Node: the public contract (proto/abc/pdp/v1/pdp.proto) is
// loaded at run time, so there is no generated code to keep in step with it.
//
//   node client.js [PDP_ADDRESS] [ENVELOPE_PATH]      (or ABC_PDP and ABC_ENVELOPE)
//
// Registers the signed manifest, asks for one decision the demo manifest allows and one
// it refuses, and prints the answers as one JSON line. Exit status 1 on any error.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = process.env.ABC_PROTO_ROOT || path.join(__dirname, "..", "..", "proto");
const address = process.argv[2] || process.env.ABC_PDP || "127.0.0.1:9191";
const envelopePath = process.argv[3] || process.env.ABC_ENVELOPE || "envelope.json";

const definition = protoLoader.loadSync("abc/pdp/v1/pdp.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // the .proto's field names: run_id, args_json, ...
  longs: String, // int64 (max_tokens, budgets) as strings: no precision lost
  defaults: true,
});
const { DecisionService } = grpc.loadPackageDefinition(definition).abc.pdp.v1;
const pdp = new DecisionService(address, grpc.credentials.createInsecure());

// Promisify one unary call with a deadline, as every call to the PDP should have.
function call(method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 5000);
    pdp[method](request, { deadline }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

async function decide(runId, requestId, tool, args) {
  const reply = await call("Decide", {
    run_id: runId,
    request_id: requestId,
    // Arguments as JSON bytes: judged exactly as sent (a Struct would make numbers doubles).
    action: { kind: "tool", target: `tool:${tool}`, args_json: Buffer.from(JSON.stringify(args)) },
  });
  return {
    allow: reply.allow,
    codes: reply.reasons.map((reason) => reason.code),
    decision_id: reply.decision_id,
  };
}

async function main() {
  const envelope = fs.readFileSync(envelopePath, "utf8").trim();
  const run = await call("RegisterManifest", { envelope: Buffer.from(envelope) });
  const suffix = `${process.pid}-${Date.now()}`; // fresh request ids: each run decides anew
  const allowed = await decide(run.run_id, `node-a-${suffix}`, "kb/search", { query: "refund policy" });
  const refused = await decide(run.run_id, `node-r-${suffix}`, "kb/drop_tables", {});
  console.log(JSON.stringify({ run_id: run.run_id, allowed, refused }));
}

main()
  .catch((error) => {
    console.error(`abc node client: ${error.message}`);
    process.exitCode = 1;
  })
  .finally(() => pdp.close());
