// The JSON schemas the structured-output tests constrain replies to (web/tests/structured.test.mjs
// against kiln serve, browser.test.mjs in Chromium).
// Ten schemas: nested objects, arrays with min/max items, enums, bounded numbers,
// required/optional properties, anyOf, strings with patterns and lengths.
const name = { type: "string", minLength: 1, maxLength: 12 };
export const SCHEMAS = [
  { type: "object", properties: { name, age: { type: "integer", minimum: 0, maximum: 120 } }, required: ["name", "age"], additionalProperties: false },
  { type: "object", properties: { color: { enum: ["red", "green", "blue"] }, shade: { type: "number", minimum: 0, maximum: 1 } }, required: ["color"], additionalProperties: false },
  { type: "object", properties: { tags: { type: "array", items: { type: "string", maxLength: 6 }, minItems: 2, maxItems: 4 } }, required: ["tags"], additionalProperties: false },
  {
    type: "object",
    properties: { user: { type: "object", properties: { id: { type: "integer", minimum: 1, maximum: 9999 }, email: { type: "string", pattern: "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$" } }, required: ["id", "email"], additionalProperties: false } },
    required: ["user"],
    additionalProperties: false,
  },
  { type: "object", properties: { value: { anyOf: [{ type: "integer", minimum: -50, maximum: 50 }, { type: "string", maxLength: 8 }, { type: "boolean" }] } }, required: ["value"], additionalProperties: false },
  { type: "array", items: { type: "integer", minimum: 0, maximum: 99 }, minItems: 1, maxItems: 5 },
  { type: "object", properties: { code: { type: "string", pattern: "^[A-Z]{3}-[0-9]{2}$" }, ok: { type: "boolean" }, note: { type: "string", maxLength: 10 } }, required: ["code", "ok"], additionalProperties: false },
  {
    type: "object",
    properties: { point: { type: "object", properties: { x: { type: "number", minimum: -10, maximum: 10 }, y: { type: "number", minimum: -10, maximum: 10 } }, required: ["x", "y"], additionalProperties: false }, label: { enum: ["a", "b", null] } },
    required: ["point", "label"],
    additionalProperties: false,
  },
  { type: "object", properties: { items: { type: "array", items: { type: "object", properties: { n: { type: "integer", minimum: 1, maximum: 9 }, s: { enum: ["x", "y"] } }, required: ["n", "s"], additionalProperties: false }, minItems: 1, maxItems: 3 } }, required: ["items"], additionalProperties: false },
  { type: "object", properties: { kind: { const: "event" }, day: { type: "integer", minimum: 1, maximum: 31 }, month: { enum: ["jan", "feb", "mar"] }, title: name }, required: ["kind", "day", "month", "title"], additionalProperties: false },
];

