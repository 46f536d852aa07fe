// Writes the table v1-amounts.csv.gz holds: the published escrow service's commission, net and referral share for
// every half-micro budget from 0.10005 to 4.99995 (step 0.0001: the budgets whose exact 1% ends in
// half a micro-USDC) and for a set of edges and seeded pseudo-random budgets, computed the way the
// service computes them: in JavaScript, on binary floats, with toFixed(6) and parseFloat.
//
//   node make_table.js | gzip -n -9 > v1-amounts.csv.gz
//
// Columns are micro-USDC integers: budget, commission, net, referral share (of a referred create).
"use strict";

const COMMISSION_RATE = 0.01;
const REFERRAL_COMMISSION_RATE = 0.15;

function micros(text) {
  const [whole, frac = ""] = text.split(".");
  return BigInt(whole) * 1000000n + BigInt((frac + "000000").slice(0, 6));
}

function text(microsValue) {
  const whole = microsValue / 1000000n;
  const frac = (microsValue % 1000000n).toString().padStart(6, "0");
  return `${whole}.${frac}`;
}

function row(budgetMicros) {
  // The service receives the budget as a JSON number: the double nearest to its decimal text.
  const amountUsd = JSON.parse(text(budgetMicros));
  const commissionUsd = parseFloat((amountUsd * COMMISSION_RATE).toFixed(6));
  const net = parseFloat((amountUsd - commissionUsd).toFixed(6));
  const referral = parseFloat((commissionUsd * REFERRAL_COMMISSION_RATE).toFixed(6));
  return [budgetMicros, micros(commissionUsd.toFixed(6)), micros(net.toFixed(6)), micros(referral.toFixed(6))];
}

const budgets = [];
for (let m = 100050n; m < 5000000n; m += 100n) budgets.push(m); // 0.10005, 0.10015, ..., 4.99995
const edges = [
  "0.1", "0.100001", "0.10045", "0.100450", "0.101", "0.105", "0.11", "0.15", "0.5", "0.999999", "1",
  "1.000001", "4.99995", "5", "5.000001", "9.99995", "10", "33.33335", "99.99995", "100", "1000.00005",
  "12345.678905", "99999.99995", "1000000", "999999.999995",
];
for (const edge of edges) budgets.push(micros(edge));
// Seeded pseudo-random budgets with six decimals up to 100,000 (a 32-bit LCG, so the table is
// the same on every run).
let state = 20261127;
function next() {
  state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
  return state;
}
for (let i = 0; i < 4000; i++) {
  const scale = [1000000n, 10000000n, 100000000n, 1000000000n, 100000000000n][next() % 5];
  const m = 100000n + (BigInt(next()) * 65536n + BigInt(next() & 0xffff)) % scale;
  budgets.push(m);
}
process.stdout.write("budget_micros,commission_micros,net_micros,referral_micros\n");
for (const b of budgets) process.stdout.write(row(b).join(",") + "\n");
