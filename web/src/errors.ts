/**
 * One error tree, with the vault's stable wire codes (vault/core/errors.py):
 * the service answers `{"error": "[code] message", "code": code}` and the
 * page gets the same class the Python client raises.
 *
 *     VaultError
 *     ├── ConfigError          (config)           a bad split URL, option or split.json
 *     ├── IntegrityError       (integrity)        a head that does not match split.json
 *     ├── InputError           (bad_input)        unknown / missing input, wrong dtype
 *     ├── LicenceError         (licence, licence_*, wrong_model, wrong_keyserver, permission_denied)
 *     │   ├── TokenError       (token_invalid)    missing, malformed, forged: one opaque error
 *     │   │   └── TokenExpiredError (token_expired)
 *     │   ├── QuotaExhaustedError (quota_exhausted)  the licence's quota
 *     │   │   └── TokenSpentError (token_spent)    the token's own call budget
 *     │   └── RateLimitedError (rate_limited)      retryAfter: seconds
 *     ├── UnavailableError     (unavailable, timeout, request_timeout, keyserver*)
 *     │                                           the service (or its licence server) cannot be reached
 *     └── ComputeError         (compute)          the head or the tail failed
 */

export class VaultError extends Error {
  /** The stable wire code (`quota_exhausted`, `token_expired`, ...). */
  readonly code: string;
  /** The HTTP status the service answered with, when it answered. */
  readonly status: number | undefined;
  /** Seconds to wait before retrying, when the service said so (Retry-After). */
  readonly retryAfter: number | undefined;

  constructor(message: string, code = "vault_error", status?: number, retryAfter?: number) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

export class ConfigError extends VaultError {}
export class IntegrityError extends VaultError {}
export class InputError extends VaultError {}
export class ComputeError extends VaultError {}
export class UnavailableError extends VaultError {}
export class LicenceError extends VaultError {}
export class TokenError extends LicenceError {}
export class TokenExpiredError extends TokenError {}
export class QuotaExhaustedError extends LicenceError {}
export class TokenSpentError extends QuotaExhaustedError {}
export class RateLimitedError extends LicenceError {}

type ErrorClass = new (m: string, c?: string, s?: number, r?: number) => VaultError;

const BY_CODE: Record<string, ErrorClass> = {
  config: ConfigError,
  integrity: IntegrityError,
  bad_input: InputError,
  compute: ComputeError,
  unavailable: UnavailableError,
  timeout: UnavailableError,
  request_timeout: UnavailableError,
  keyserver: UnavailableError,
  keyserver_unavailable: UnavailableError,
  not_found: ConfigError,
  method_not_allowed: ConfigError,
  unsupported_encoding: ConfigError,
  worker: ComputeError,
  worker_crashed: ComputeError,
  unknown_model: ConfigError,
  protocol: InputError,
  licence: LicenceError,
  licence_unknown: LicenceError,
  licence_revoked: LicenceError,
  licence_expired: LicenceError,
  permission_denied: LicenceError,
  wrong_keyserver: LicenceError,
  wrong_model: LicenceError,
  token_invalid: TokenError,
  token_expired: TokenExpiredError,
  quota_exhausted: QuotaExhaustedError,
  token_spent: TokenSpentError,
  rate_limited: RateLimitedError,
};

/** The error class for a wire code; a code this client does not know is
 * classed by its HTTP status (5xx: UnavailableError), else VaultError. */
export function errorFor(code: string, message: string, status?: number, retryAfter?: number): VaultError {
  const cls = BY_CODE[code] ?? (status !== undefined && status >= 500 ? UnavailableError : VaultError);
  return new cls(message, code, status, retryAfter);
}
