defmodule SseGateway.Token do
  @moduledoc """
  HS256 JSON Web Tokens for the gateway, signed with `:crypto`.

  The gateway reads these claims (docs/API.md, "Auth"): `exp` (required, Unix
  seconds), `subscribe` and `publish` (lists of topic patterns: a topic, or a
  prefix ending in `*`), `org` (the tenant, with tenancy on), `nbf`, `sub`.

      # in a Phoenix controller: a browser may read one project for 5 minutes
      token =
        SseGateway.Token.sign(
          %{subscribe: [SseGateway.Projects.topic_project(project.uuid)], sub: user.uuid},
          secret: Application.fetch_env!(:my_app, :sse_gateway_secret),
          ttl: 300
        )
  """

  @doc """
  Signs `claims` (a map, atom or string keys). `secret_or_opts` is the HS256
  secret, or options: `secret:` (else `config :sse_gateway, secret:`) and
  `ttl:` seconds (default 300) used when `claims` has no `exp`.
  """
  @spec sign(map(), binary() | keyword()) :: String.t()
  def sign(claims, secret_or_opts)

  def sign(claims, secret) when is_binary(secret), do: sign(claims, secret: secret)

  def sign(claims, opts) when is_map(claims) and is_list(opts) do
    secret =
      Keyword.get_lazy(opts, :secret, fn -> Application.fetch_env!(:sse_gateway, :secret) end)

    ttl = Keyword.get(opts, :ttl, 300)
    claims = Map.new(claims, fn {k, v} -> {to_string(k), v} end)
    claims = Map.put_new(claims, "exp", System.system_time(:second) + ttl)

    header = b64(SseGateway.JSON.encode!(%{"alg" => "HS256", "typ" => "JWT"}))
    body = b64(SseGateway.JSON.encode!(claims))
    input = header <> "." <> body
    input <> "." <> b64(:crypto.mac(:hmac, :sha256, secret, input))
  end

  @doc """
  Checks an HS256 token's signature and `exp`: `{:ok, claims}` or
  `{:error, :invalid | :expired}`. For tests and for apps that accept these
  tokens back; the gateway does its own checking.
  """
  @spec verify(String.t(), binary()) :: {:ok, map()} | {:error, :invalid | :expired}
  def verify(token, secret) do
    with [h, b, sig] <- String.split(token, "."),
         {:ok, mac} <- Base.url_decode64(sig, padding: false),
         true <- :crypto.hash_equals(mac, :crypto.mac(:hmac, :sha256, secret, h <> "." <> b)),
         {:ok, json} <- Base.url_decode64(b, padding: false),
         {:ok, %{} = claims} <- SseGateway.JSON.decode(json) do
      if is_integer(claims["exp"]) and claims["exp"] > System.system_time(:second),
        do: {:ok, claims},
        else: {:error, :expired}
    else
      _ -> {:error, :invalid}
    end
  end

  defp b64(bin), do: Base.url_encode64(bin, padding: false)
end
