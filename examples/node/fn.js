#!/usr/bin/env node
// A warmed Node.js function, used as a mitosis seed.
//
// Start-up requires zlib, crypto, path and util, builds warm state (a word table, a
// compressed blob and its digest), runs the libuv thread pool once (an async deflate and
// an async pbkdf2) so every thread Node will use exists, answers one request internally and
// prints `ready`. Then every line on stdin (read through process.stdin, Node's own event
// loop) gets one JSON line on stdout, "pid" last:
//
//   {"n": 5} -> {"n": 5, "word": ..., "path": ..., "sha256": ..., "deflated": ...,
//                "roundtrip": true, "label": ..., "threads": T, "pid": P}
//
// "threads" is the thread count of the process at that moment (/proc/self/task), "pid" the
// pid of the process answering (read from /proc/self: Node's process.pid is fixed at start).
// A SIGUSR1 (process.on) writes the line `usr1`. EOF on stdin: exit 0.
//
// Output is written with fs.writeSync(1): one write(2) per line, no stream buffering.
//
//   --once   answer one request (the first line) and exit 0: the cold start baseline and
//            the reference answer.

'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const util = require('util');
const zlib = require('zlib');

function buildState() {
  const words = [];
  for (let i = 0; i < 512; i++) {
    const h = crypto.createHash('sha1').update(util.format('word-%d', i)).digest('hex');
    words.push(h.slice(0, 4 + (i % 9)));
  }
  const blob = Buffer.from(words.join(' ').repeat(8));
  const deflated = zlib.deflateSync(blob, { level: 9 });
  const key = crypto.pbkdf2Sync('mitosis', 'seed', 2000, 32, 'sha256');
  return { words, blob, deflated, key };
}

const STATE = buildState();

function threadCount() {
  return fs.readdirSync('/proc/self/task').length;
}

function livePid() {
  return Number(fs.readlinkSync('/proc/self'));
}

function answer(request) {
  const n = Number(request.n);
  if (!Number.isInteger(n)) {
    throw new Error('n must be an integer');
  }
  const word = STATE.words[Math.abs(n) % STATE.words.length];
  const payload = Buffer.from(util.format('%s:%d:%s', word, n, STATE.key.toString('hex')));
  const hmac = crypto.createHmac('sha256', STATE.key).update(payload).digest('hex');
  const deflated = zlib.deflateSync(Buffer.concat([STATE.blob.subarray(0, 256 + (Math.abs(n) % 1024)), payload]));
  return {
    n,
    word,
    path: path.posix.join('/fn', word, '..', String(n), 'out.json'),
    sha256: hmac.slice(0, 16),
    deflated: deflated.length,
    roundtrip: zlib.inflateSync(STATE.deflated).equals(STATE.blob),
    label: util.inspect({ n, w: word.length }),
  };
}

function reply(line) {
  let out;
  try {
    out = answer(JSON.parse(line));
  } catch (err) {
    out = { error: `${err.name}: ${err.message}` };
  }
  out.threads = threadCount();
  out.pid = livePid();
  return JSON.stringify(out) + '\n';
}

function writeAll(text) {
  const data = Buffer.from(text);
  let off = 0;
  while (off < data.length) {
    try {
      off += fs.writeSync(1, data, off, data.length - off);
    } catch (err) {
      if (err.code !== 'EAGAIN') {
        throw err;
      }
    }
  }
}

function serve(once) {
  let pending = '';
  process.stdin.on('data', (chunk) => {
    pending += chunk.toString('utf8');
    let nl;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      if (line.trim() === '') {
        continue;
      }
      writeAll(reply(line));
      if (once) {
        process.exit(0);
      }
    }
  });
  process.stdin.on('end', () => {
    if (pending.trim() !== '') {
      writeAll(reply(pending));
    }
    process.exit(0);
  });
}

function main() {
  const args = process.argv.slice(2);
  const once = args.includes('--once');
  if (args.some((a) => a !== '--once')) {
    process.stderr.write('usage: fn.js [--once]\n');
    process.exit(2);
  }
  if (once) {
    serve(true);
    return;
  }
  process.on('SIGUSR1', () => writeAll('usr1\n'));
  // The thread pool starts on first use: use it now, so it is part of the warm state.
  let left = 2;
  const warmed = (err) => {
    if (err) {
      throw err;
    }
    if (--left === 0) {
      reply('{"n": 0}');
      writeAll('ready\n');
      serve(false);
    }
  };
  zlib.deflate(STATE.blob, (err) => warmed(err));
  crypto.pbkdf2('mitosis', 'warm', 1000, 32, 'sha256', (err) => warmed(err));
}

main();
