defmodule SseGateway.JSON do
  @moduledoc """
  The one place JSON is encoded and decoded: picks a codec once.

  Order: `config :sse_gateway, json: Module` when set (any module with
  `encode_to_iodata!/1`-or-`encode!/1` and `decode/1`), else Elixir's own
  `JSON` (1.18+), else `Jason` when the host app has it loaded, else
  `SseGateway.JSON.Native`, a small codec of this library. Decoding always
  gives maps with string keys: nothing from the network becomes an atom.
  """

  @doc "The codec in use: `JSON`, `Jason` or `SseGateway.JSON.Native`."
  @spec codec() :: module()
  def codec do
    case :persistent_term.get({__MODULE__, :codec}, nil) do
      nil ->
        codec = pick()
        :persistent_term.put({__MODULE__, :codec}, codec)
        codec

      codec ->
        codec
    end
  end

  @doc false
  def pick do
    cond do
      mod = Application.get_env(:sse_gateway, :json) -> mod
      elixir_json?() -> JSON
      Code.ensure_loaded?(Jason) and function_exported?(Jason, :decode, 1) -> Jason
      true -> SseGateway.JSON.Native
    end
  end

  # A module called `JSON` existed in old hex packages; only Elixir's own
  # (1.18+) has `encode_to_iodata!/1`.
  defp elixir_json? do
    Version.match?(System.version(), ">= 1.18.0") and Code.ensure_loaded?(JSON) and
      function_exported?(JSON, :encode_to_iodata!, 1)
  end

  @doc "Encodes a term to a binary; raises on terms JSON cannot hold."
  @spec encode!(term()) :: binary()
  def encode!(term), do: encode_with!(codec(), term)

  @doc false
  def encode_with!(SseGateway.JSON.Native, term), do: SseGateway.JSON.Native.encode!(term)

  def encode_with!(mod, term) do
    if function_exported?(mod, :encode_to_iodata!, 1) do
      term |> mod.encode_to_iodata!() |> IO.iodata_to_binary()
    else
      mod.encode!(term)
    end
  end

  @doc "Like `decode/1`, raising `ArgumentError`."
  @spec decode!(binary()) :: term()
  def decode!(binary) do
    case decode(binary) do
      {:ok, term} -> term
      {:error, reason} -> raise ArgumentError, "invalid JSON: #{inspect(reason)}"
    end
  end

  @doc "Decodes a binary: `{:ok, term}` or `{:error, reason}`; never raises."
  @spec decode(binary()) :: {:ok, term()} | {:error, term()}
  def decode(binary) when is_binary(binary) do
    case codec().decode(binary) do
      {:ok, _} = ok -> ok
      {:error, reason} -> {:error, reason}
      # JSON.decode/1 in some versions returns a 3-tuple on error.
      other -> {:error, other}
    end
  rescue
    e -> {:error, e}
  end
end
