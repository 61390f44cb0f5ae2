defmodule SseGateway.Error do
  @moduledoc """
  Why a call to the gateway failed.

  - `status`: the HTTP status, or `nil` when no answer came (transport error,
    timeout) or the client refused the call before sending it.
  - `code`: the gateway's `error.code` (`"invalid_topic"`, `"unavailable"`, …);
    for failures without an answer: `"timeout"`, `"connection_failed"`,
    `"buffer_full"`, `"invalid_response"`.
  - `message`: the gateway's message, or one of ours, for humans.
  - `retry_after`: seconds from a `Retry-After` header (`429`, `503`), else `nil`.
  - `reason`: the underlying term for transport errors.
  """

  defexception [:status, :code, :message, :retry_after, :reason]

  @type t :: %__MODULE__{
          status: non_neg_integer() | nil,
          code: String.t(),
          message: String.t(),
          retry_after: non_neg_integer() | nil,
          reason: term()
        }

  @impl true
  def message(%__MODULE__{status: nil, code: code, message: m}), do: "#{code}: #{m}"
  def message(%__MODULE__{status: s, code: code, message: m}), do: "#{s} #{code}: #{m}"

  @doc """
  Whether the same request may succeed later: no answer at all, `429`, `503`,
  and `502`/`504` from a proxy in front. Retried with the same idempotency key,
  such a request is stored at most once.
  """
  @spec transient?(t()) :: boolean()
  def transient?(%__MODULE__{status: nil, code: code}),
    do: code in ["timeout", "connection_failed"]

  def transient?(%__MODULE__{status: s}), do: s in [429, 502, 503, 504]
end
